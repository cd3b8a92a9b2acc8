"""A gradient index: the training side computed once, any number of query sets answered from it (docs/index.md).

``build_index`` makes one pass over the training sequences and stores each
one's per-layer gradient compressed (by default its own largest coordinates
in the EK-FAC eigenbasis, weighted by what they add to a preconditioned inner
product); ``score_with_index`` then
computes only the queries' gradients and contracts them with the index, and
``two_stage_with_index`` re-scores each query's top at full rank with the model.
"""

from .build import build_index
from .codecs import CODECS
from .config import METHODS, IndexConfig
from .plan import GradientIndex
from .score import score_with_index, two_stage_with_index

__all__ = ["IndexConfig", "build_index", "GradientIndex", "score_with_index", "two_stage_with_index", "METHODS", "CODECS"]
