"""Achievement-based multi-task weights (method.md §3; Yun & Cho, ICCV 2023).

For dataset m: a_m = EMA of its dev F1 (the first evaluation sets it), w̃_m = max(0, 1 − a_m/(margin·p_m))^γ,
w = softmax(w̃) over datasets. Before any evaluation the weights are uniform. Datasets far from their
reference get more weight."""
from __future__ import annotations

import math


class AchievementWeights:
    def __init__(self, datasets: list[str], reference_f1: dict, margin: float = 1.05, gamma: float = 2.0,
                 ema: float = 0.1, enabled: bool = True):
        if margin <= 1.0:
            raise ValueError(f"margin must be > 1 (got {margin}): an achievement equal to the reference must "
                             "keep a positive weight")
        unknown = sorted(set(reference_f1) - set(datasets))
        if unknown:
            raise ValueError(f"reference_f1 names datasets that are not trained: {unknown}")
        for name, value in reference_f1.items():
            if not 0 < value <= 1:
                raise ValueError(f"reference_f1[{name!r}] = {value}: use F1 in (0, 1]")
        self.datasets, self.margin, self.gamma, self.ema, self.enabled = list(datasets), margin, gamma, ema, enabled
        self.reference = {name: float(reference_f1.get(name, 1.0)) for name in self.datasets}
        self.achievement: dict[str, float] = {}
        self.weights = [1.0 / len(self.datasets)] * len(self.datasets)

    def update(self, dev_f1: dict) -> list[float]:
        """Fold in one evaluation's F1 (0..1) per dataset; returns the new weights (uniform when disabled)."""
        for name in self.datasets:
            if name in dev_f1:
                new = float(dev_f1[name])
                old = self.achievement.get(name)
                self.achievement[name] = new if old is None else self.ema * new + (1 - self.ema) * old
        if not self.enabled:
            return self.weights
        raw = []
        for name in self.datasets:
            a = self.achievement.get(name, 0.0)
            raw.append(max(0.0, 1.0 - a / (self.margin * self.reference[name])) ** self.gamma)
        top = max(raw)
        exp = [math.exp(v - top) for v in raw]
        self.weights = [e / sum(exp) for e in exp]
        return self.weights

    def state_dict(self) -> dict:
        return {"achievement": dict(self.achievement), "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.achievement = {k: float(v) for k, v in state["achievement"].items()}
        self.weights = [float(w) for w in state["weights"]]
