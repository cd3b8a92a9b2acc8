"""Curvature approximations behind one interface, fitting them, and the Factors they make."""

from .base import Curvature, EigenbasisCurvature, Identity
from .factors import Factors, load_factors, save_factors, tracked_modules
from .fit import fit_factors
from .lissa import LiSSA, LissaSolver
from .strategies import EKFAC, KFAC, STRATEGY_CLASSES, Diagonal, make_curvature

__all__ = [
    "Curvature",
    "EigenbasisCurvature",
    "Identity",
    "Diagonal",
    "KFAC",
    "EKFAC",
    "LiSSA",
    "LissaSolver",
    "STRATEGY_CLASSES",
    "make_curvature",
    "Factors",
    "fit_factors",
    "load_factors",
    "save_factors",
    "tracked_modules",
]
