"""C-LoRAE: collaborative multi-LoRA experts (config / layer / model, peft style)."""
from .config import AdapterConfigError, CLoRAEConfig
from .layer import CLoRAELinear
from .model import (adapter_state_dict, apply_clorae, checkpoint_context_fn, clorae_layers, collect_mim_loss,
                    is_trainable, load_adapter, mark_trainable, parameter_report, read_adapter_config,
                    routing_stats, save_adapter, task_routing)
from .routing import RoutingError, TaskRouting

__all__ = [
    "AdapterConfigError", "CLoRAEConfig", "CLoRAELinear", "RoutingError", "TaskRouting", "adapter_state_dict",
    "apply_clorae", "checkpoint_context_fn", "clorae_layers", "collect_mim_loss", "is_trainable", "load_adapter",
    "mark_trainable", "parameter_report", "read_adapter_config", "routing_stats", "save_adapter", "task_routing",
]
