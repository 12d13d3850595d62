"""Paired bootstrap over dev samples: how much of a difference in All between two arms is dev-sampling noise.

Both arms are scored on the same resamples (drawn with replacement within each score key, so every dataset
keeps its size); the interval is the 2.5-97.5 percentile of All(arm) − All(reference). Seeds: each resample
is applied to every seed's predictions and the difference of the seed means is taken, so the interval covers
dev sampling, not seed variance (the seeds' std shows that)."""
from __future__ import annotations

import numpy as np

from .score import sample_counts


def _counts(rows: list[dict]) -> dict:
    """(key, id) → (true positives, predicted, gold)."""
    return {(r["key"], r["id"]): sample_counts(r["predicted"], r["gold"]) for r in rows}


def _all_scores(counts: np.ndarray, draws: dict) -> np.ndarray:
    """All (Σ F1 × 100) for each resample; counts (samples, 3) in the order of `draws`' indices."""
    total = 0.0
    for indices in draws.values():  # (resamples, samples of that key)
        tp, predicted, gold = (counts[:, i][indices].sum(axis=1) for i in range(3))
        precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
        recall = np.divide(tp, gold, out=np.zeros(len(tp)), where=gold > 0)
        total = total + np.divide(2 * precision * recall, precision + recall,
                                  out=np.zeros(len(tp)), where=precision + recall > 0)
    return 100.0 * total


def paired_bootstrap(arm_runs: list[list[dict]], reference_runs: list[list[dict]], resamples: int = 1000,
                     seed: int = 0) -> dict:
    """arm_runs / reference_runs: one list of prediction rows per seed (rows as written by write_predictions).
    Every run must hold the same sample ids."""
    runs = [_counts(rows) for rows in arm_runs + reference_runs]
    ids = sorted(runs[0])
    for counts in runs[1:]:
        if sorted(counts) != ids:
            raise ValueError("paired_bootstrap: the runs were scored on different dev samples")
    keys = np.array([key for key, _ in ids])
    rng = np.random.default_rng(seed)
    draws = {}
    for key in sorted(set(keys)):
        positions = np.flatnonzero(keys == key)
        draws[key] = positions[rng.integers(0, len(positions), size=(resamples, len(positions)))]
    matrices = [np.array([counts[i] for i in ids], dtype=float) for counts in runs]
    whole = {key: np.flatnonzero(keys == key)[None, :] for key in draws}  # the dev set itself, once

    def seed_mean_difference(selection: dict) -> np.ndarray:
        scores = [_all_scores(m, selection) for m in matrices]
        return np.mean(scores[:len(arm_runs)], axis=0) - np.mean(scores[len(arm_runs):], axis=0)

    observed = float(seed_mean_difference(whole)[0])
    difference = seed_mean_difference(draws)
    low, high = np.percentile(difference, [2.5, 97.5])
    return {"difference": observed, "low": float(low), "high": float(high),
            "share_above_zero": float(np.mean(difference > 0)), "resamples": resamples}
