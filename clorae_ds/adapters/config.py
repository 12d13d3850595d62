"""Configuration of the C-LoRAE adapter (method.md §1, §2, §4)."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Optional

MODES = ("clorae", "universal_only", "task_only", "no_gate")
# The paper's three tasks, one task expert each; the data layer maps each dataset to one of them.
DEFAULT_TASKS = ("mner", "mre", "mee")
# Keys of older adapter configs and recipes that no longer choose anything: expert_path picked between a per-task
# segment path and the masked pass, which is now the only one (fewest kernels; it measured fastest on CPU).
RETIRED_KEYS = ("expert_path",)
# Not peft's adapter_config.json / adapter_model.safetensors: tools that find those names take a folder for a peft
# adapter, which ours is not (launchers/export.py writes real peft folders). Folders saved under the old names load.
ADAPTER_CONFIG_NAME = "clorae_config.json"
ADAPTER_WEIGHTS_NAME = "clorae_model.safetensors"
LEGACY_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterConfigError(ValueError):
    """A C-LoRAE configuration that cannot describe a valid adapter."""


@dataclass
class CLoRAEConfig:
    """What to adapt and how.

    `target_modules` / `modules_to_save` entries match a module's dotted name either as a suffix on a
    dot boundary (peft style: "q" matches "encoder.block.0.layer.0.SelfAttention.q") or, failing that,
    as a regular expression that must match the whole name. Linears inside a `modules_to_save` module
    are never adapted: those modules are new (no pretrained weights) and train fully.
    """

    rank: int = 8  # r: the universal expert's rank (task experts get r // N unless task_rank)
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # one task expert each, in this order
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.1  # on the adapter branch's input, which the experts and the gate read
    target_modules: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "wi", "wo"])  # linears to adapt (name suffix or regex)
    mode: str = "clorae"  # clorae | universal_only (LoRA) | task_only | no_gate
    mim_beta: float = 0.01  # beta: weight of the MIM loss (0: no MIM)
    task_rank: Optional[int] = None  # r_t: each task expert's rank (default rank // number of tasks)
    # VID teacher: each layer's universal expert output U is a constant target in that layer's MIM term, so
    # MIM never updates that layer's universal expert. It does update the task experts (students), the
    # regressor and, through the layer input (the student's own input), every earlier layer's parameters,
    # universal experts included, as any loss on a hidden layer's output does.
    mim_detach_teacher: bool = True
    modules_to_save: list[str] = field(default_factory=list)  # modules that train fully and are saved with the adapter
    base_model_name: str = ""  # recorded in the adapter file (set by the builder)

    def __post_init__(self):
        if self.mode not in MODES:
            raise AdapterConfigError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if isinstance(self.tasks, str) or not self.tasks:
            raise AdapterConfigError(f"tasks must be a non-empty list of names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise AdapterConfigError(f"tasks must be distinct, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.uses_task_experts and self.expert_task_rank < 1:
            raise AdapterConfigError(
                f"task expert rank is {self.expert_task_rank} (rank {self.rank} // {len(self.tasks)} tasks);"
                " raise rank or set task_rank >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.mim_beta < 0:
            raise AdapterConfigError(f"mim_beta must be >= 0, got {self.mim_beta!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise AdapterConfigError("target_modules must be a non-empty list of name patterns")
        self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        for pattern in self.target_modules + self.modules_to_save:
            try:
                re.compile(pattern)
            except re.error as err:
                raise AdapterConfigError(f"bad module pattern {pattern!r}: {err}") from None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def expert_task_rank(self) -> int:
        """r_t: the rank of each task expert (rank // N unless task_rank is given)."""
        return self.task_rank if self.task_rank is not None else self.rank // self.num_tasks

    @property
    def uses_universal(self) -> bool:
        return self.mode != "task_only"

    @property
    def uses_task_experts(self) -> bool:
        return self.mode != "universal_only"

    @property
    def uses_gate(self) -> bool:
        return self.mode == "clorae"

    @property
    def uses_mim(self) -> bool:
        return self.uses_universal and self.uses_task_experts and self.mim_beta > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def task_id(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise AdapterConfigError(f"unknown task {task!r}; this adapter knows {self.tasks}") from None

    def to_dict(self) -> dict:
        return {"method": "clorae", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "CLoRAEConfig":
        data = dict(data)
        method = data.pop("method", "clorae")
        if method != "clorae":
            raise AdapterConfigError(f"adapter method is {method!r}, not 'clorae'")
        for key in RETIRED_KEYS:
            data.pop(key, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(f"unknown adapter config keys: {unknown}")
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "CLoRAEConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise AdapterConfigError(f"cannot read adapter config {path}: {err}") from None
        if not isinstance(data, dict):
            raise AdapterConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)


def name_matches(name: str, patterns: list[str]) -> bool:
    """True when a dotted module name matches one pattern (dot-boundary suffix, else full regex)."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        if re.fullmatch(pattern, name):
            return True
    return False
