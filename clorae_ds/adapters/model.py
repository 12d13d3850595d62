"""Fitting C-LoRAE into a model: replace linears, route tasks, decide what trains and what is saved."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LEGACY_ADAPTER_FILES, AdapterConfigError, CLoRAEConfig,
                     name_matches)
from .layer import MIM_COLUMNS, CLoRAELinear, KernelPolicy, mim_loss
from .routing import TaskRouting

EXPERT_PARAMS = ("expert_A", "expert_B")  # the gate is expert_A's last row, the MIM regressor expert_B's last columns
LEGACY_MIM_PARAMS = ("mim_shift", "mim_scale", "mim_var")  # before one mim_regressor: its columns, in order


def apply_clorae(model: nn.Module, config: CLoRAEConfig) -> nn.Module:
    """Replace every nn.Linear whose name matches `config.target_modules` (outside `modules_to_save`) by a
    CLoRAELinear, then freeze all but the adapter and the modules to save. Returns the model."""
    if getattr(model, "clorae_config", None) is not None:
        raise AdapterConfigError("this model already has a C-LoRAE adapter")
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name_matches(name, config.target_modules) \
                and not inside_modules(name, config.modules_to_save):
            targets.append(name)
    if not targets:
        raise AdapterConfigError(f"no nn.Linear matches target_modules {config.target_modules}; "
                                 f"linears are named like {_example_linear_names(model)}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CLoRAELinear(getattr(parent, child), config))
    model.clorae_config = config
    # Every forward and every loss collection lists the adapted layers: walking the modules of even the default
    # model took ~1.7 ms (CPU) each time, some 2.5 % of its step at micro-batch 1, so the list is kept.
    model.clorae_layer_list = [(name, module) for name, module in model.named_modules()
                               if isinstance(module, CLoRAELinear)]
    mark_trainable(model)
    return model


def inside_modules(name: str, prefixes: list[str]) -> bool:
    """True when the module `name` or one of its parents matches a pattern."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), prefixes) for i in range(1, len(parts) + 1))


def _example_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]


def clorae_layers(model: nn.Module) -> Iterator[tuple[str, CLoRAELinear]]:
    """(name, layer) of every adapted layer of `model`, in module order: the list apply_clorae made where it fitted
    `model` itself, else found by walking its modules."""
    layers = model.__dict__.get("clorae_layer_list")
    if layers is not None:
        return iter(layers)
    return ((name, module) for name, module in model.named_modules() if isinstance(module, CLoRAELinear))


def is_trainable(model: nn.Module, name: str) -> bool:
    """The one rule for what trains and what an adapter file holds: expert, gate and MIM parameters of the
    adapted layers, plus every parameter of a `modules_to_save` module. Full fine-tuning (no adapter
    config): everything."""
    config: Optional[CLoRAEConfig] = getattr(model, "clorae_config", None)
    if config is None:
        return True
    owner, _, leaf = name.rpartition(".")
    if leaf in EXPERT_PARAMS and isinstance(model.get_submodule(owner), CLoRAELinear):
        return True
    return inside_modules(owner, config.modules_to_save)


def parameter_groups(model: torch.nn.Module, lr: float, new_module_lr: float,
                     weight_decay: float) -> list[dict]:
    """Adapter experts, gates and MIM regressors; new modules (and, in full fine-tuning, the pretrained weights
    at `lr`). Only trainable parameters reach the optimiser."""
    patterns = list(getattr(model, "new_module_patterns", ()))

    groups = {"experts": [], "new_modules": [], "pretrained": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner, _, leaf = name.rpartition(".")
        on_adapter = isinstance(model.get_submodule(owner), CLoRAELinear) if owner else False
        if on_adapter and leaf in EXPERT_PARAMS:
            groups["experts"].append(param)
        elif inside_modules(owner, patterns):
            groups["new_modules"].append(param)
        else:
            groups["pretrained"].append(param)
    rates = {"experts": lr, "new_modules": new_module_lr, "pretrained": lr}
    return [{"params": params, "lr": rates[name], "weight_decay": weight_decay, "name": name}
            for name, params in groups.items() if params]


def mark_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(model, name))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if is_trainable(model, name)}


def set_task_routing(model: nn.Module, task_ids: torch.Tensor, record_stats: bool = False,
                     token_masks: Optional[list[torch.Tensor]] = None) -> list:
    """Route every adapted layer of `model` by `task_ids` (batch,) until restore_task_routing(model, returned);
    `record_stats` accumulates the gate statistics read by routing_stats(); `token_masks` are (batch, length) masks
    of real tokens, one per sequence length the model runs (the MIM loss leaves padding out; a layer input whose
    length has no mask counts every token). Clears MIM terms left uncollected by an earlier call, so a forgotten
    collection never keeps an old graph alive. Plain attribute stores, no context manager: MIEModel.forward calls
    it inside the graph torch.compile captures."""
    layers = [layer for _, layer in clorae_layers(model)]
    if not layers:  # no adapter (full fine-tuning): nothing to route
        return []
    routing = TaskRouting(task_ids, layers[0].config.num_tasks, record_stats, token_masks)
    previous = [layer.routing for layer in layers]
    for layer in layers:
        layer.routing = routing
        layer.pop_mim_terms()
    return previous


def restore_task_routing(model: nn.Module, previous: list) -> None:
    for (_, layer), routing in zip(clorae_layers(model), previous):
        layer.routing = routing


@contextlib.contextmanager
def task_routing(model: nn.Module, task_ids: torch.Tensor, record_stats: bool = False,
                 token_masks: Optional[list[torch.Tensor]] = None):
    """set_task_routing for the calls made inside the block (forward or generate)."""
    previous = set_task_routing(model, task_ids, record_stats, token_masks)
    try:
        yield
    finally:
        restore_task_routing(model, previous)


def set_kernel_policy(model: nn.Module, policy: Optional[KernelPolicy]) -> None:
    """Run every adapted layer of `model` with `policy`'s kernels whatever its device (benchmarks force CUDA's on a
    CPU to count a GPU step's work); None: each device's own (layer.KERNEL_POLICIES)."""
    for _, layer in clorae_layers(model):
        layer.kernel_policy = policy


def checkpoint_context_fn(model: nn.Module) -> Callable[[], tuple]:
    """A `context_fn` for torch.utils.checkpoint (non-reentrant) around blocks of `model`: a checkpointed block is
    recomputed during backward, after task_routing's block has exited, so the recompute gets back the routing its
    forward had (captured when the forward ran) and its layers record no MIM term or gate statistic a second time
    (CLoRAELinear.replaying)."""
    layers = [layer for _, layer in clorae_layers(model)]

    def context_fn():
        return contextlib.nullcontext(), _replaying(layers, layers[0].routing if layers else None)

    return context_fn


@contextlib.contextmanager
def _replaying(layers: list, routing: Optional[TaskRouting]):
    previous = [(layer.routing, layer.replaying) for layer in layers]
    for layer in layers:
        layer.routing, layer.replaying = routing, True
    try:
        yield
    finally:
        for layer, (prev_routing, prev_replaying) in zip(layers, previous):
            layer.routing, layer.replaying = prev_routing, prev_replaying


def collect_mim_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """L_MIM: the sum over adapted layer calls of each call's MIM term (a mean over the batch's real tokens
    and channels, as L_MT is a mean over the batch's tokens), recorded since the last collection; None when
    nothing was recorded (eval, or a mode without MIM). So β weighs each adapted layer's distillation term."""
    return mim_loss([t for _, layer in clorae_layers(model) for t in layer.pop_mim_terms()])


def routing_stats(model: nn.Module, reset: bool = True) -> dict[str, torch.Tensor]:
    """Per adapted layer: mean gate weight on the task expert for each task (NaN where a task had no
    tokens) over the calls routed with record_stats=True since the last reset (method.md Fig. 6)."""
    stats = {}
    for name, layer in clorae_layers(model):
        if not layer.uses_gate:
            continue
        stats[name] = layer.gate_stats[:, 1] / layer.gate_stats.sum(1)
        if reset:
            layer.gate_stats.zero_()
    return stats


def save_adapter(model: nn.Module, directory: str, state_dict: Optional[dict] = None, card: Optional[str] = None) -> str:
    """Write clorae_config.json + clorae_model.safetensors (+ README.md, the model `card`) atomically (temp dir,
    then rename). `state_dict` overrides the model's own tensors (e.g. ones gathered from ZeRO-3 partitions)."""
    config: Optional[CLoRAEConfig] = getattr(model, "clorae_config", None)
    if config is None:
        raise AdapterConfigError("model has no C-LoRAE adapter (apply_clorae first)")
    tensors = state_dict if state_dict is not None else adapter_state_dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        config.save(os.path.join(tmp, ADAPTER_CONFIG_NAME))
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def adapter_files(directory: str) -> tuple[str, str]:
    """(config, weights) paths of an adapter folder: ours, or the peft-like names folders had before."""
    names = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)) and \
            os.path.isfile(os.path.join(directory, LEGACY_ADAPTER_FILES[0])):
        with open(os.path.join(directory, LEGACY_ADAPTER_FILES[0])) as f:
            try:
                legacy = json.load(f)
            except json.JSONDecodeError as err:
                raise AdapterConfigError(f"{directory}/{LEGACY_ADAPTER_FILES[0]}: not JSON ({err})") from None
        if "peft_type" in legacy:
            raise AdapterConfigError(f"{directory} holds a peft {legacy['peft_type']} adapter, not a C-LoRAE one: "
                                     "load it with peft.PeftModel.from_pretrained(base_model, folder)")
        names = LEGACY_ADAPTER_FILES
    return os.path.join(directory, names[0]), os.path.join(directory, names[1])


def read_adapter_config(directory: str) -> CLoRAEConfig:
    path = adapter_files(directory)[0]
    if not os.path.isfile(path):
        raise AdapterConfigError(f"no {ADAPTER_CONFIG_NAME} in {directory!r}: not an adapter directory")
    return CLoRAEConfig.load(path)


COMPATIBLE_FIELDS = ("mode", "rank", "tasks", "task_rank", "target_modules", "modules_to_save")


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load an adapter saved by save_adapter into a model fitted with the same adapter config (or into a
    bare model, which is fitted first). No pickle: safetensors only."""
    saved = read_adapter_config(directory)
    current: Optional[CLoRAEConfig] = getattr(model, "clorae_config", None)
    if current is None:
        apply_clorae(model, saved)
        current = saved
    diffs = [f"{f}: saved {getattr(saved, f)!r} vs model {getattr(current, f)!r}"
             for f in COMPATIBLE_FIELDS if getattr(saved, f) != getattr(current, f)]
    if current.uses_mim != saved.uses_mim:
        diffs.append(f"mim: saved {saved.uses_mim} vs model {current.uses_mim}")
    if diffs:
        raise AdapterConfigError(f"adapter in {directory} does not fit this model: " + "; ".join(diffs))
    weights_path = adapter_files(directory)[1]
    if not os.path.isfile(weights_path):
        raise AdapterConfigError(f"missing {os.path.basename(weights_path)} in {directory!r}")
    tensors = _fold_legacy_mim(_fold_legacy_gate(_pack_legacy_mim(load_file(weights_path))))
    params = dict(model.named_parameters())
    expected = {name for name in params if is_trainable(model, name)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterConfigError(f"adapter {weights_path} does not match the model: missing {missing[:5]}"
                                 f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise AdapterConfigError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                                         f"model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return model


def _pack_legacy_mim(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter files written before a layer's MIM regressor became one (d_out, 3) tensor hold three vectors per
    layer (mim_shift, mim_scale, mim_var): stacked here into the regressor's columns."""
    for name in [n for n in tensors if n.endswith(".mim_scale")]:
        prefix = name[:-len("mim_scale")]
        if all(prefix + leaf in tensors for leaf in LEGACY_MIM_PARAMS):
            columns = [tensors.pop(prefix + leaf) for leaf in LEGACY_MIM_PARAMS]
            tensors[prefix + "mim_regressor"] = torch.stack(columns, 1)
    return tensors


def _fold_legacy_mim(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter files written before the MIM regressor became expert_B's last columns hold it apart, as
    mim_regressor (d_out, 3): appended to expert_B."""
    for name in [n for n in tensors if n.endswith(".mim_regressor")]:
        prefix = name[:-len("mim_regressor")]
        if prefix + "expert_B" in tensors:
            tensors[prefix + "expert_B"] = torch.cat([tensors[prefix + "expert_B"], tensors.pop(name)], 1)
    return tensors


def _fold_legacy_gate(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter files written before the gate became expert_A's last row hold it as W_g (2, d_in): its row p (the
    gate softmax([−p·x, p·x]) = softmax(W_g·x), p = (W_g[1] − W_g[0]) / 2) appended to expert_A."""
    for name in [n for n in tensors if n.endswith(".gate")]:
        prefix = name[:-len("gate")]
        if prefix + "expert_A" in tensors:
            gate = tensors.pop(name)
            tensors[prefix + "expert_A"] = torch.cat([tensors[prefix + "expert_A"], (gate[1:] - gate[:1]) / 2])
    return tensors


def numel(param: torch.Tensor) -> int:
    """A parameter's full size, also under ZeRO-3 (a partitioned parameter holds an empty placeholder and
    keeps its real size in `ds_numel`)."""
    return getattr(param, "ds_numel", None) or param.numel()


def parameter_report(model: nn.Module) -> dict:
    """Trainable parameters by kind, with the per-layer formula check of method.md §1:
    (r + N·r_t)(d_in + d_out) + 2·d_in per adapted linear (MIM regressors counted apart, though stored as expert_B's
    last 3 columns), less d_in with a gate: its two rows W_g = [−p; p] are stored as p (CLoRAELinear's _task_gate
    says why that is the same gate)."""
    experts = mim = 0
    expected_experts = 0
    for _, layer in clorae_layers(model):
        c = layer.config
        d_in, d_out = layer.in_features, layer.out_features
        regressor = MIM_COLUMNS * d_out if c.uses_mim else 0
        experts += sum(numel(getattr(layer, p)) for p in EXPERT_PARAMS if getattr(layer, p) is not None) - regressor
        mim += regressor
        expected_experts += ((c.rank if c.uses_universal else 0)
                             + (c.num_tasks * c.expert_task_rank if c.uses_task_experts else 0)) * (d_in + d_out) \
            + (d_in if c.uses_gate else 0)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return {
        "adapted_layers": sum(1 for _ in clorae_layers(model)),
        "expert_params": experts,
        "expert_params_formula": expected_experts,
        "mim_params": mim,
        "new_module_params": trainable - experts - mim if getattr(model, "clorae_config", None) else 0,
        "trainable_params": trainable,
        "total_params": total,
    }
