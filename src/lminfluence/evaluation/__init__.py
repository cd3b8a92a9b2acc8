"""Ground truth for checking influence estimators (docs/method.md §8): PBRF and LDS."""

from .lds import GroundTruth, LDSResult, build_ground_truth, lds, make_subsets
from .pbrf import (
    PBRFConfig,
    PBRFConvergenceError,
    PBRFResult,
    bregman_divergence,
    pbrf_influence,
)

__all__ = [
    "PBRFConfig",
    "PBRFResult",
    "PBRFConvergenceError",
    "pbrf_influence",
    "bregman_divergence",
    "GroundTruth",
    "LDSResult",
    "build_ground_truth",
    "make_subsets",
    "lds",
]
