"""Micro precision / recall / F1 over exact tuples, per score key (dataset, or dataset_subtask for events).

Keys: twitter2015, twitter2017, snap, mnre_v1, mnre_v2 (entity / relation F1), and for event datasets
m2e2_trigger (MED) and m2e2_argument (MEAE), ace05_…, swig_…. "All" is the sum of the keys' F1 × 100, as the
paper's Table 2. Each predicted tuple consumes at most one matching gold tuple (multiset intersection)."""
from __future__ import annotations

from collections import Counter, defaultdict

from ..data.record import Record


def score_key(record: Record) -> str:
    return f"{record.dataset}_{record.subtask}" if record.task == "mee" else record.dataset


def sample_counts(predicted: list[tuple], gold: list[tuple]) -> tuple[int, int, int]:
    """(true positives, predicted, gold) of one sample; each predicted tuple consumes at most one gold tuple.
    Tuples may come as lists (rows read back from a predictions JSONL)."""
    predicted, gold = [tuple(t) for t in predicted], [tuple(t) for t in gold]
    return sum((Counter(predicted) & Counter(gold)).values()), len(predicted), len(gold)


def score(predictions: list[list[tuple]], golds: list[list[tuple]], keys: list[str]) -> dict:
    if not len(predictions) == len(golds) == len(keys):
        raise ValueError(f"score needs parallel lists, got {len(predictions)}, {len(golds)}, {len(keys)}")
    counts = defaultdict(lambda: [0, 0, 0])  # true positives, predicted, gold
    for predicted, gold, key in zip(predictions, golds, keys):
        for i, n in enumerate(sample_counts(predicted, gold)):
            counts[key][i] += n
    report = {}
    for key in sorted(counts):
        tp, n_pred, n_gold = counts[key]
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[key] = {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "predicted": n_pred,
                       "gold": n_gold}
    report["All"] = 100.0 * sum(v["f1"] for v in report.values())
    return report


def dataset_f1(report: dict) -> dict:
    """F1 per dataset (the mean over its keys: an event dataset's trigger and argument F1)."""
    per_dataset = defaultdict(list)
    for key, value in report.items():
        if key == "All":
            continue
        dataset = key.rsplit("_", 1)[0] if key.endswith(("_trigger", "_argument")) else key
        per_dataset[dataset].append(value["f1"])
    return {name: sum(values) / len(values) for name, values in per_dataset.items()}
