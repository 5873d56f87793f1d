"""Evaluation: one row scorer shared by `emoq eval` and `emoq predict`, the literature's metrics, and the
reports that carry the protocol next to the numbers."""

from .metrics import METRIC_DEFINITIONS, compute_metrics
from .runner import Row, RowResult, map_answer, score_rows, score_rows_sharded

__all__ = ["METRIC_DEFINITIONS", "Row", "RowResult", "compute_metrics", "map_answer", "score_rows",
           "score_rows_sharded"]
