"""Adapters out of clorae_ds: a plain peft LoRA, or the adapter folded into the base weights.

Both exist only where the adapter's computation is a fixed low-rank update, the same for every token:
- `universal_only` (the `lora` arm): ΔW = (α/r)·B_U·A_U;
- `task_only` and `no_gate`, for one task n: ΔW = (α/r)·[B_U B_n]·[A_U; A_n], one LoRA of rank r + r_t
  (r_t alone for task_only) whose peft alpha is rescaled so that alpha / rank stays α/r.
The `clorae` mode mixes its experts per token by the gate softmax(W_g·x): no fixed weight equals it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import AdapterConfigError, CLoRAEConfig
from .model import clorae_layers, inside_modules

PEFT_PREFIX = "base_model.model."  # peft's key prefix over the wrapped transformers model


class ExportError(AdapterConfigError):
    pass


def _check_exportable(model: nn.Module, task: Optional[str], what: str) -> tuple[CLoRAEConfig, Optional[int]]:
    config: Optional[CLoRAEConfig] = getattr(model, "clorae_config", None)
    if config is None:
        raise ExportError("the model has no C-LoRAE adapter")
    if config.uses_gate:
        raise ExportError(f"{what}: the clorae mode mixes its experts per token with the gate softmax(W_g·x), which "
                          "no fixed LoRA weight can express; serve it with clorae_ds (launchers/predict.py)")
    if getattr(model, "visual", None) is not None:
        raise ExportError(f"{what}: the model has the UMIE visual side, which transformers and peft cannot load")
    if config.uses_task_experts:
        if task is None:
            raise ExportError(f"{what}: mode {config.mode} has one expert per task; pass --task, one of {config.tasks}")
        return config, config.task_id(task)
    if task is not None:
        config.task_id(task)  # an unknown task: the error names the known ones
    return config, None


def lora_factors(layer, task_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, d_in), B (d_out, rank)) with ΔW = (α/r)·B·A for one task: the universal expert, the task's, or
    both side by side."""
    weights = layer.expert_weights()
    A, B = [], []
    if "universal_A" in weights:
        A.append(weights["universal_A"])
        B.append(weights["universal_B"])
    if "task_A" in weights:
        A.append(weights["task_A"][task_id])
        B.append(weights["task_B"][task_id])
    return torch.cat(A, 0), torch.cat(B, 1)


def _lm_name(name: str) -> str:
    """A module's name inside the transformers model (MIEModel keeps it as `lm`)."""
    if not name.startswith("lm."):
        raise ExportError(f"adapted module {name!r} lies outside the transformers model")
    return name[len("lm."):]


def modules_to_save(model: nn.Module, config: CLoRAEConfig) -> list[str]:
    """The outermost modules of the transformers model that train fully (names inside it)."""
    names = [name for name, _ in model.named_modules() if name and inside_modules(name, config.modules_to_save)]
    outermost = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    return [_lm_name(n) for n in outermost]


def peft_lora(model: nn.Module, task: Optional[str] = None, base_model_name: Optional[str] = None) -> tuple[dict, dict]:
    """(adapter_config.json contents, adapter_model.safetensors tensors) of a plain peft LoRA equal to the adapter
    for `task`: target modules by full name, the fully trained modules as modules_to_save, peft's key names."""
    config, task_id = _check_exportable(model, task, "export to peft")
    tensors, targets, rank = {}, [], None
    for name, layer in clorae_layers(model):
        A, B = lora_factors(layer, task_id)
        rank = A.shape[0]
        key = PEFT_PREFIX + _lm_name(name)
        tensors[f"{key}.lora_A.weight"] = A.contiguous()
        tensors[f"{key}.lora_B.weight"] = B.contiguous()
        targets.append(_lm_name(name))
    saved = modules_to_save(model, config)
    for name in saved:  # the module's whole state dict, as peft saves and expects it (tied weights included)
        for key, value in model.lm.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().clone()  # tied ones apart: safetensors
    lm = model.lm
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if getattr(lm.config, "is_encoder_decoder", False) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or config.base_model_name,
        "r": rank, "lora_alpha": config.scaling * rank, "lora_dropout": config.dropout, "bias": "none",
        "target_modules": targets, "modules_to_save": saved or None, "fan_in_fan_out": False,
        "inference_mode": True,
    }
    return peft_config, {k: v.to("cpu") for k, v in tensors.items()}


@torch.no_grad()
def merge_adapter(model: nn.Module, task: Optional[str] = None) -> nn.Module:
    """The transformers model with the adapter for `task` folded into its base weights (W0 + (α/r)·B·A, computed
    in fp32) and every adapted layer back to a plain nn.Linear; the MIM regressor is dropped."""
    config, task_id = _check_exportable(model, task, "merge")
    for name, layer in list(clorae_layers(model)):
        A, B = lora_factors(layer, task_id)
        base: nn.Linear = layer.base
        delta = config.scaling * (B.float() @ A.float())
        base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    model.__dict__.pop("clorae_layer_list", None)
    model.clorae_config = None
    return model.lm


def model_card(config: CLoRAEConfig, base_model: str, datasets: list, step: int, dev_f1: dict, dev_all: float) -> str:
    """README.md written beside an adapter's weights: what it is, what it was trained on, how it scored, how to
    load it."""
    ranks = f"universal rank {config.rank}" if config.uses_universal else ""
    if config.uses_task_experts:
        ranks += f"{', ' if ranks else ''}task rank {config.expert_task_rank} per task"
    rows = "\n".join(f"| {key} | {100 * f1:.1f} |" for key, f1 in sorted(dev_f1.items()))
    if config.uses_gate:
        elsewhere = ("The `clorae` mode gates its experts per token, which no plain LoRA expresses: serve it with "
                     "clorae_ds (`launchers/predict.py`).")
    else:
        task = " --task NAME" if config.uses_task_experts else ""
        elsewhere = (f"As a plain peft LoRA: `python launchers/export.py ADAPTER --to peft --out DIR{task}`, then "
                     "`peft.PeftModel.from_pretrained(base_model, DIR)`; merged into the base weights for serving: "
                     f"`python launchers/export.py ADAPTER --merge --out DIR{task}`.")
    return f"""# C-LoRAE adapter ({config.mode})

- base model: `{base_model}`
- mode: `{config.mode}`, tasks {", ".join(config.tasks)}; {ranks}; alpha {config.alpha:g}; target modules
  {", ".join(f"`{t}`" for t in config.target_modules)}
- trained on: {", ".join(datasets)}; {step} optimiser steps

## Dev F1 at this adapter's evaluation (× 100)

| dataset | F1 |
|---|---|
{rows}
| All (sum) | {dev_all:.1f} |

## Loading

With clorae_ds: `python launchers/predict.py --adapter ADAPTER --task mner --text "..."`, or in Python
`clorae_ds.eval.inference.load_trained(ADAPTER)` (the base model comes from `run_config.json` beside the adapter).
{elsewhere}
"""
