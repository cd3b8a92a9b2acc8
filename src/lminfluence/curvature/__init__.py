"""Curvature approximations behind one interface, fitting them, and the Factors they make."""

from .base import Curvature, EigenbasisCurvature, Identity
from .factors import Factors, load_factors, save_factors, tracked_modules
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
    "load_factors",
    "save_factors",
    "tracked_modules",
]
