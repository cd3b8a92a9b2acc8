"""Curvature approximations behind one interface, and fitting them."""

from .base import Curvature, EigenbasisCurvature, Identity
from .fit import Factors, fit_factors
from .lissa import LiSSA, LissaDataError, LissaDivergenceError, attach_data
from .strategies import EKFAC, KFAC, STRATEGY_CLASSES, Diagonal, make_curvature

__all__ = [
    "Curvature",
    "EigenbasisCurvature",
    "Identity",
    "Diagonal",
    "KFAC",
    "EKFAC",
    "LiSSA",
    "LissaDivergenceError",
    "LissaDataError",
    "attach_data",
    "STRATEGY_CLASSES",
    "make_curvature",
    "Factors",
    "fit_factors",
]
