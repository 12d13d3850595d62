"""Evaluation: gold tuples, the parser of generated structures, the micro-F1 scorer."""
from .parse import ParseStats, gold_tuples, normalize_span, parse
from .score import dataset_f1, score, score_key

__all__ = ["ParseStats", "dataset_f1", "gold_tuples", "normalize_span", "parse", "score", "score_key"]
