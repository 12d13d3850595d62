"""Backbones: T5, an encoder-decoder from a BERT-style checkpoint, LLaVA; the UMIE visual side."""
from .builder import DEFAULT_TARGETS, BuiltModel, ModelBuildError, ModelConfig, minilm_dir
from .mie_model import MIEModel
from .tokenizer import load_tokenizer, train_tokenizer
from .visual import VisualConfig, VisualSide

__all__ = ["DEFAULT_TARGETS", "BuiltModel", "MIEModel", "ModelBuildError", "ModelConfig", "VisualConfig",
           "VisualSide", "load_tokenizer", "minilm_dir", "train_tokenizer"]
