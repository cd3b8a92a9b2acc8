"""Curvature approximations behind one interface, and fitting them."""

from .base import Curvature, EigenbasisCurvature, Identity
from .fit import Factors, fit_factors
from .strategies import EKFAC, KFAC, STRATEGY_CLASSES, Diagonal, make_curvature

__all__ = [
    "Curvature",
    "EigenbasisCurvature",
    "Identity",
    "Diagonal",
    "KFAC",
    "EKFAC",
    "STRATEGY_CLASSES",
    "make_curvature",
    "Factors",
    "fit_factors",
]
