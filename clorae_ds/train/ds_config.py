"""The DeepSpeed JSON as this project reads it: known keys only, the sections the recipe owns refused, `ds.KEY=VALUE`
overrides, batch sizes checked against the recipe's micro-batch and the world size, bf16 only where the hardware has
it. Nothing here calls DeepSpeed (engine.py does)."""
from __future__ import annotations

import importlib.util
import json
from typing import Optional

from .hardware import bf16_supported

# Top-level DeepSpeed keys this project's configs may use: DeepSpeed ignores unknown keys silently, so a typo
# would change nothing without a word.
KNOWN_DS_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "communication_data_type", "prescale_gradients",
    "activation_checkpointing", "checkpoint", "dump_state", "seed",
    "tensorboard", "csv_monitor", "wandb", "comet",
}
# Who owns what (README, "The recipe and the DeepSpeed config"): the DeepSpeed JSON owns parallelism, batch sizes,
# precision, clipping and monitors; the recipe owns the optimizer, its schedule and compilation. A section of the
# recipe's in the JSON would be ignored by DeepSpeed beside the client optimizer, so it is refused.
RECIPE_OWNED_DS_KEYS = {
    "optimizer": "the recipe owns the optimizer (AdamW): set optim.lr, optim.new_module_lr, optim.betas, "
                 "optim.weight_decay",
    "scheduler": "the recipe owns the learning-rate schedule: set optim.warmup_steps and optim.decay "
                 "(linear | cosine | constant)",
    "compile": "the recipe owns compilation: set model.compile=true (torch.compile of the model before DeepSpeed "
               "wraps it)",
}
MONITOR_PACKAGES = {"tensorboard": "tensorboard", "csv_monitor": None, "wandb": "wandb", "comet": "comet_ml"}
KNOWN_ZERO_KEYS = {
    "stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_bucket_size",
    "allgather_partitions", "offload_optimizer", "offload_param", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save", "sub_group_size", "round_robin_gradients",
}


class EngineConfigError(ValueError):
    pass


def load_ds_config(path: str, world_size: int, overrides=(), micro_batch: Optional[int] = 8) -> dict:
    """Read and check a DeepSpeed JSON with `ds.KEY=VALUE` overrides applied (a launcher's way to change it
    without rewriting the file): unknown keys, sections the recipe owns, monitors whose package is missing, batch
    sizes against the recipe's micro-batch (data.micro_batch_size; None where nothing trains: the file's, else 1)
    and the world size; bf16 falls back to fp32 where the hardware has no bf16 (a GPU without it, a CPU without
    AVX512-BF16 / AMX-BF16)."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise EngineConfigError(f"cannot read DeepSpeed config {path}: {err}") from None
    for assignment in overrides:
        apply_ds_override(config, assignment)
    check_ds_config(config, path)
    if micro_batch is None:
        micro_batch = config.get("train_micro_batch_size_per_gpu", 1)
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise EngineConfigError(f"{path}: train_micro_batch_size_per_gpu must be a positive integer")
    if config.get("train_micro_batch_size_per_gpu", micro_batch) != micro_batch:
        raise EngineConfigError(
            f"{path}: train_micro_batch_size_per_gpu {config['train_micro_batch_size_per_gpu']} differs from the "
            f"recipe's data.micro_batch_size {micro_batch}: the recipe owns the micro-batch (the loader cuts batches "
            "by it); set data.micro_batch_size and leave the key out of the JSON")
    config["train_micro_batch_size_per_gpu"] = micro_batch
    accumulation = config.get("gradient_accumulation_steps", 1)
    if not isinstance(accumulation, int) or accumulation < 1:
        raise EngineConfigError(f"{path}: gradient_accumulation_steps must be a positive integer")
    total = config.get("train_batch_size")
    if total is not None and total != micro_batch * accumulation * world_size:
        raise EngineConfigError(
            f"{path}: train_batch_size {total} != micro batch {micro_batch} x gradient accumulation {accumulation} x "
            f"world size {world_size}; remove train_batch_size or make them agree")
    config["train_batch_size"] = micro_batch * accumulation * world_size
    if bf16_enabled(config) and not bf16_supported():
        config["bf16"] = {"enabled": False}
    return config


def bf16_enabled(ds_config: dict) -> bool:
    return bool(ds_config.get("bf16", {}).get("enabled"))


def apply_ds_override(config: dict, assignment: str) -> None:
    """`ds.a.b=value` (value parsed as YAML) into the DeepSpeed config."""
    import yaml

    key, sep, value = assignment.partition("=")
    parts = key.split(".")
    if not sep or parts[0] != "ds" or len(parts) < 2 or not all(parts[1:]):
        raise EngineConfigError(f"DeepSpeed override {assignment!r} is not ds.KEY=VALUE")
    node = config
    for part in parts[1:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise EngineConfigError(f"DeepSpeed override {assignment!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def precision_of(config: dict) -> str:
    return "bf16" if bf16_enabled(config) else "fp16" if config.get("fp16", {}).get("enabled") else "fp32"


def ds_settings(path: str, overrides, config: dict) -> dict:
    """What the run takes from the DeepSpeed side and where each came from: the file, a ds.* override or
    DeepSpeed's default (and precision's hardware fallback)."""
    overridden = {a.partition("=")[0][len("ds."):].split(".")[0] for a in overrides}
    with open(path) as f:
        in_file = json.load(f)

    def source(key: str) -> str:
        return f"command line ds.{key}" if key in overridden else path if key in in_file else "default"

    precision = precision_of(config)
    asked = {**in_file, **{k: config[k] for k in ("bf16", "fp16") if k in overridden and k in config}}
    precision_source = source("bf16") if bf16_enabled(asked) else source("fp16")
    if bf16_enabled(asked) and precision != "bf16":
        precision_source += " asks bf16; this hardware has no bf16 matmuls"
    return {"micro_batch": {"value": config["train_micro_batch_size_per_gpu"], "from": "recipe data.micro_batch_size"},
            "gradient_accumulation": {"value": config.get("gradient_accumulation_steps", 1),
                                      "from": source("gradient_accumulation_steps")},
            "precision": {"value": precision, "from": precision_source},
            "gradient_clipping": {"value": config.get("gradient_clipping", 0.0), "from": source("gradient_clipping")},
            "monitors": sorted(k for k in MONITOR_PACKAGES if config.get(k, {}).get("enabled"))}


def check_ds_config(config: dict, where: str) -> None:
    for key, why in RECIPE_OWNED_DS_KEYS.items():
        if key in config:
            raise EngineConfigError(f"{where}: the \"{key}\" section is refused: {why}")
    for key, package in MONITOR_PACKAGES.items():
        section = config.get(key, {})
        if not isinstance(section, dict):
            raise EngineConfigError(f"{where}: {key} must be a section like {{\"enabled\": true, \"output_path\": ...}}")
        if section.get("enabled") and package and importlib.util.find_spec(package) is None:
            raise EngineConfigError(f"{where}: the {key} monitor needs the {package} package: pip install {package} "
                                    f"(or pip install -e '.[{key}]')")
    unknown = sorted(set(config) - KNOWN_DS_KEYS)
    unknown += sorted(f"zero_optimization.{k}" for k in set(config.get("zero_optimization", {})) - KNOWN_ZERO_KEYS)
    for key, value in config.items():
        if value == "auto" or (isinstance(value, dict) and "auto" in value.values()):
            raise EngineConfigError(f"{where}: {key} is 'auto': there is no HF Trainer to fill it; give a value")
    if unknown:
        raise EngineConfigError(f"{where}: unknown DeepSpeed keys {unknown} (DeepSpeed would ignore them silently)")


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)
