"""Capturing layer inputs and output-gradients; the Linear/Conv1D adapter."""

from .collector import Collector, LayerCapture, TrackingError
from .modules import LayerInfo, fingerprint, layer_info, resolve_modules, weight_matrix

__all__ = [
    "Collector",
    "LayerCapture",
    "TrackingError",
    "LayerInfo",
    "fingerprint",
    "layer_info",
    "resolve_modules",
    "weight_matrix",
]
