"""C-LoRAE: collaborative multi-LoRA experts (config / layer / model, peft style; reference.py is the method in
plain autograd)."""
from .config import MODES, AdapterConfigError, CLoRAEConfig
from .layer import KERNEL_POLICIES, CLoRAELinear, KernelPolicy
from .model import (adapter_state_dict, apply_clorae, checkpoint_context_fn, clorae_layers, collect_mim_loss,
                    is_trainable, load_adapter, mark_trainable, parameter_report, read_adapter_config,
                    restore_task_routing, routing_stats, save_adapter, set_kernel_policy, set_task_routing,
                    task_routing)
from .routing import RoutingError, TaskRouting, check_task_ids

__all__ = [
    "KERNEL_POLICIES", "MODES", "AdapterConfigError", "CLoRAEConfig", "CLoRAELinear", "KernelPolicy", "RoutingError",
    "TaskRouting", "adapter_state_dict", "apply_clorae", "check_task_ids", "checkpoint_context_fn", "clorae_layers",
    "collect_mim_loss", "is_trainable", "load_adapter", "mark_trainable", "parameter_report", "read_adapter_config",
    "restore_task_routing", "routing_stats", "save_adapter", "set_kernel_policy", "set_task_routing", "task_routing",
]
