"""The run recipe: model, data, loss, optimiser, schedule, evaluation, output. YAML + key=value overrides."""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class LossConfig:
    aml: bool = True  # False: uniform task weights (the "w/o AML" ablation)
    # p_m: reference (single-task state-of-the-art) F1 per dataset, 0..1; datasets without one use 1.0.
    reference_f1: dict = field(default_factory=dict)
    margin: float = 1.05  # w = (1 − s/(margin·p))^gamma before the softmax
    gamma: float = 2.0  # focusing exponent of the achievement weights
    ema: float = 0.1  # a ← ema·new + (1 − ema)·a; the first evaluation sets a directly
    # A NaN/inf loss: stop within a log interval, naming the step (no sync a step), or skip the step on every
    # rank (one small all-reduce a micro-batch, to decide before the step).
    nonfinite: str = "stop"
    max_skipped_steps: int = 10  # with nonfinite=skip: stop after this many skipped steps


@dataclass
class OptimConfig:
    lr: float = 8e-4  # adapter experts, gate and MIM regressor (one tensor per layer: CLoRAELinear)
    new_module_lr: float = 1e-3  # new modules (cross-attention from an encoder checkpoint, visual side)
    weight_decay: float = 0.0  # AdamW weight decay of every group
    warmup_steps: int = 20  # linear warm-up steps of the learning rate
    decay: str = "linear"  # linear | cosine | constant
    betas: tuple = (0.9, 0.999)  # AdamW betas


@dataclass
class ScheduleConfig:
    epochs: int = 3  # epochs, each ending with an evaluation, new task weights and a checkpoint
    max_steps: Optional[int] = None  # optimiser steps; stops early (evaluates, saves)
    max_minutes: Optional[float] = None  # wall-clock budget for training, checked at log intervals
    log_every: int = 10  # optimiser steps between progress lines, train events and monitor writes
    # Sync the device around forward, backward and step and log their seconds per logging interval
    # (train event `phase_seconds`, with the data wait): for profiling, as the syncs cost speed.
    time_phases: bool = False


@dataclass
class EvalConfig:
    max_new_tokens: int = 48  # generation length at evaluation
    batch_size: int = 32  # samples per generation batch
    num_beams: int = 1  # beam search width (1: greedy)
    max_samples: Optional[int] = None  # per dataset, first N (quick runs); None: the whole dev split


@dataclass
class OutputConfig:
    dir: str = "runs/default"  # where checkpoints, adapters, events and pictures go
    keep_last: int = 2  # checkpoints kept
    save: bool = True  # false: no checkpoints, no adapter files (speed runs of large shapes)
    # A checkpoint every N optimiser steps besides the one after each evaluation (kill -9 loses at most N
    # steps; --resume continues mid-epoch exactly); None: after evaluations only.
    save_every_steps: Optional[int] = None


from ..data.loader import DataConfig  # noqa: E402
from ..metrics import MetricsConfig  # noqa: E402
from ..models import ModelConfig  # noqa: E402


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(family="encoder_decoder", pretrained="minilm"))
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    seed: int = 0  # adapter initialisation, data order and dropout
    dist_timeout_s: int = 1800  # collectives fail after this; also bounds how long ranks wait for rank 0's evaluation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "loss": LossConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
            "eval": EvalConfig, "output": OutputConfig, "metrics": MetricsConfig}


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """`a.b.c=value` (value parsed as YAML: numbers, true/false, null, lists, {k: v})."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not key=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = _parse_value(value)


def _coerce(where: str, value: Any, expected: Any) -> Any:
    """`value` as the annotated type, or a ConfigError naming the key, the value and the type. YAML reads
    `1e-3` as a string (only `1.0e-3` is a float): numeric strings become numbers."""
    if typing.get_origin(expected) is typing.Union:
        options = [t for t in typing.get_args(expected) if t is not type(None)]
        if value is None:
            return None
        expected = options[0] if len(options) == 1 else Any
    if expected is Any:
        return value
    origin = typing.get_origin(expected) or expected
    if origin is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    elif isinstance(value, origin):
        return value
    name = getattr(expected, "__name__", str(expected))
    raise ConfigError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


def _build_section(name: str, cls, value: dict):
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    bad = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
    if bad:
        raise ConfigError(f"unknown keys in {name}: {bad}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(f"{name}.{key}", item, hints[key]) for key, item in value.items()})


def build_model(model: dict) -> ModelConfig:
    """The model section as the builder will read it (ModelConfig, its adapter and visual options), checked
    before any rank starts: building the configs loads nothing."""
    from ..adapters import AdapterConfigError
    from ..models.builder import ModelBuildError
    if not isinstance(model, dict):
        raise ConfigError("config section 'model' must be a mapping")
    try:
        config = _build_section("model", ModelConfig, model)
        if isinstance(config.adapter, dict):
            from ..adapters import CLoRAEConfig
            _build_section("model.adapter", CLoRAEConfig, {k: v for k, v in config.adapter.items()})
        config.adapter_config()
    except (ModelBuildError, AdapterConfigError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None
    return config


def build_config(data: dict) -> RunConfig:
    data = dict(data)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ConfigError(f"unknown config sections: {unknown}")
    kwargs = {}
    for name, value in data.items():
        if name in SECTIONS:
            kwargs[name] = _build_section(name, SECTIONS[name], value)
        elif name == "model":
            kwargs[name] = build_model(value)
        else:
            kwargs[name] = _coerce(name, value, typing.get_type_hints(RunConfig)[name])
    config = RunConfig(**kwargs)
    if config.loss.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"loss.nonfinite must be stop or skip, got {config.loss.nonfinite!r}")
    loss = config.loss
    if loss.margin <= 1.0:
        raise ConfigError(f"loss.margin must be > 1, got {loss.margin}")
    untrained = sorted(set(loss.reference_f1) - set(config.data.train)) if config.data.train else []
    if untrained:
        raise ConfigError(f"loss.reference_f1 names datasets that data.train does not train: {untrained}")
    bad = {name: value for name, value in loss.reference_f1.items()
           if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1}
    if bad:
        raise ConfigError(f"loss.reference_f1 values must be F1 in (0, 1], got {bad}")
    if config.optim.decay not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optim.decay must be linear, cosine or constant, got {config.optim.decay!r}")
    return config


def load_config(path: Optional[str], overrides: list[str] = (), base: Optional[dict] = None) -> RunConfig:
    data = json.loads(json.dumps(base)) if base else {}
    if path:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a run config is a mapping")
        data = _merge(data, loaded)
    for assignment in overrides:
        apply_override(data, assignment)
    return build_config(data)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _field_notes(cls) -> dict:
    """field → its description: the comment on its line, else the comment lines right above it (first sentence)."""
    notes, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", stripped)
        if match and not stripped.startswith(("def ", "class ", "@", "return")):
            text = match.group(2) or " ".join(above)
            notes[match.group(1)] = re.split(r"(?<!e\.g)\.\s", text, maxsplit=1)[0].rstrip(".")
        above = []
    return notes


def recipe_reference() -> str:
    """Every recipe key with its type, default and description, from the config dataclasses themselves."""
    from ..adapters import CLoRAEConfig
    from ..models import ModelConfig

    sections = [("model", ModelConfig), ("model.adapter", CLoRAEConfig)] + \
        [(name, cls) for name, cls in SECTIONS.items()] + [("", RunConfig)]
    lines = ["recipe keys (YAML sections, or dotted key=value overrides):"]
    for prefix, cls in sections:
        notes, hints = _field_notes(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if prefix == "" and (f.name in SECTIONS or f.name == "model"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else \
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            kind = re.sub(r"typing\.|Optional\[(.*)\]", r"\1", str(hints[f.name]).replace("<class '", "").replace("'>", ""))
            key = f"{prefix}.{f.name}" if prefix else f.name
            lines.append(f"  {key} ({kind}, default {default!r}): {notes.get(f.name, '')}")
    return "\n".join(lines)
