"""Ground truth for checking influence estimators (METHOD.md §8): PBRF and LDS."""

from .pbrf import PBRFConfig, PBRFConvergenceError, PBRFResult, bregman_divergence, pbrf_influence

__all__ = ["PBRFConfig", "PBRFResult", "PBRFConvergenceError", "pbrf_influence", "bregman_divergence"]
