"""Evaluation: gold tuples, the parser of generated structures (and, with the evaluation issue, the scorer)."""
from .parse import ParseStats, gold_tuples, normalize_span, parse

__all__ = ["ParseStats", "gold_tuples", "normalize_span", "parse"]
