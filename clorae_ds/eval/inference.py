"""Rebuild a trained model from its adapter directory for evaluation and prediction."""
from __future__ import annotations

import json
import os
from typing import Optional

import yaml

from ..adapters import load_adapter, read_adapter_config
from ..data.loader import Encoding
from ..models import BuiltModel, ModelConfig


class InferenceError(ValueError):
    pass


def load_trained(adapter_dir: str, model_config: Optional[str] = None) -> tuple[BuiltModel, dict]:
    """The model config comes from `model_config` (a JSON/YAML file of ModelConfig fields) or from the
    run_config.json that launchers/train.py writes beside the adapter. Returns (model, run config or {})."""
    if not os.path.isdir(adapter_dir):
        raise InferenceError(f"adapter directory {adapter_dir!r} does not exist")
    read_adapter_config(adapter_dir)  # a clear error when the directory holds no adapter
    run = {}
    if model_config is None:
        candidate = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "run_config.json")
        if not os.path.isfile(candidate):
            raise InferenceError(f"no run_config.json beside {adapter_dir!r}: pass --model-config FILE")
        with open(candidate) as f:
            saved = json.load(f)
        fields, run = saved["model"], saved.get("run", {})
    else:
        with open(model_config) as f:
            fields = yaml.safe_load(f)
    config = ModelConfig.from_dict(fields)
    built = config.build()
    load_adapter(built.model, adapter_dir)
    return built, run


def encoding_for(built: BuiltModel, max_input_length: Optional[int] = None, max_target_length: Optional[int] = None,
                 image_size: int = 224) -> Encoding:
    """How this model wants its inputs: seq2seq or causal, BERT-style labels, the vision tower's image size."""
    family = built.config.family
    visual = getattr(built.model, "visual", None)
    if visual is not None and visual.tower is not None:
        image_size = visual.tower.config.image_size
    elif family == "llava":
        image_size = built.model.lm.config.vision_config.image_size
    lengths = {k: v for k, v in (("max_input_length", max_input_length), ("max_target_length", max_target_length))
               if v is not None}  # unset: Encoding's defaults, the one source of them
    return Encoding(**lengths,
                    causal=family == "llava", drop_target_bos=family == "encoder_decoder", image_size=image_size,
                    image_tokens=getattr(built.model.lm.config, "image_seq_length", 0) if family == "llava" else 0)
