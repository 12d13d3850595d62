"""clorae_ds: DeepSpeed-scaled C-LoRAE training for unified multimodal information extraction."""
__version__ = "0.1.0"
