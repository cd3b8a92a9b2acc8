"""Factors on disk: tensors as safetensors, everything else in a JSON manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file
from torch import nn

from ..config import FactorConfig
from ..hooks.modules import LayerInfo
from .atomic import atomic_write as _atomic_write
from .layout import FACTORS_FILE, FORMAT_VERSION, MANIFEST_FILE

if TYPE_CHECKING:
    from ..curvature.fit import Factors


def save_factors(factors: "Factors", path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in factors.curvature.state_dict().items()}
    _atomic_write(path / FACTORS_FILE, lambda tmp: save_file(tensors, tmp))
    manifest = {
        "format_version": FORMAT_VERSION,
        "strategy": factors.strategy,
        "config": factors.config.to_dict(),
        "layers": {n: info.to_dict() for n, info in factors.layers.items()},
        "num_tokens": factors.num_tokens,
        "num_sequences": factors.num_sequences,
        "fingerprint": factors.fingerprint,
        "meta": factors.meta,
    }

    def write_manifest(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)

    _atomic_write(path / MANIFEST_FILE, write_manifest)  # written last: its presence marks completion
    return path


def load_factors(path: str | Path, model: nn.Module | None = None) -> "Factors":
    """Read factors saved by ``Factors.save``.

    Args:
        path: the directory holding manifest.json and factors.safetensors.
        model: when given, refuse factors fitted on a model with other tracked weights.
    """
    from ..curvature.fit import Factors, tracked_modules
    from ..curvature.strategies import make_curvature

    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no factors at {path}: {MANIFEST_FILE} is missing (was the fit finished?)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    layers = {n: LayerInfo(**d) for n, d in manifest["layers"].items()}
    config = FactorConfig.from_dict(manifest["config"])
    curvature = make_curvature(manifest["strategy"], layers, config)
    tensor_path = path / FACTORS_FILE
    if not tensor_path.is_file():
        raise FileNotFoundError(f"no factors at {path}: {FACTORS_FILE} is missing next to {MANIFEST_FILE}")
    curvature.load_state_dict(load_file(str(tensor_path)))
    factors = Factors(
        config=config,
        curvature=curvature,
        num_tokens=manifest["num_tokens"],
        num_sequences=manifest["num_sequences"],
        fingerprint=manifest["fingerprint"],
        meta=manifest.get("meta", {}),
    )
    if model is not None:
        tracked_modules(model, factors)
    return factors


__all__ = ["save_factors", "load_factors"]
