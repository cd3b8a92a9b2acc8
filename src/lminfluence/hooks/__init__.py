"""Capturing layer inputs and output-gradients; the Linear/Conv1D adapter."""

from .collector import Collector, LayerCapture
from .modules import LayerInfo, layer_info, resolve_modules, weight_matrix

__all__ = [
    "Collector",
    "LayerCapture",
    "LayerInfo",
    "layer_info",
    "resolve_modules",
    "weight_matrix",
]
