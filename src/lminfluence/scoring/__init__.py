"""Pairwise, per-layer, per-token and self-influence scores; low-rank query batching."""

from .contract import LayerQueries
from .pairwise import Scores, compute_scores, compute_self_scores, precondition_queries

__all__ = ["Scores", "compute_scores", "compute_self_scores", "precondition_queries", "LayerQueries"]
