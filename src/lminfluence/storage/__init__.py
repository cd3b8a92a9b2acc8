"""Run-directory layout and on-disk formats."""

from .factors import load_factors, save_factors

__all__ = ["load_factors", "save_factors"]
