"""Observability: a Prometheus exporter per rank and the file_sd targets file."""
from .exporter import MetricsConfig, MetricsError, MetricsExporter

__all__ = ["MetricsConfig", "MetricsError", "MetricsExporter"]
