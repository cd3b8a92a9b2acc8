"""Fitted factors: the curvature of one model's tracked layers, its provenance, and its files on disk.

On disk a factors directory holds ``factors.safetensors`` (every tensor) and
``manifest.json`` (everything else), the manifest written last so that its
presence marks a finished fit. A tensor shared by several layers (the A factor
of the gate and up projections) is stored once; ``manifest["shared_a"]``
says which layers use it. ``load_factors(..., lazy=True)`` leaves the tensors
in the file and reads each layer's when it is used, so that a scoring process
holds no factors in memory once the queries are preconditioned.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import FactorConfig
from ..errors import CorruptFileError, StaleError
from ..fingerprint import model_fingerprint
from ..hooks.modules import LayerInfo, layer_info, resolve_modules
from ..storage.atomic import atomic_write, atomic_write_json
from ..storage.layout import FACTORS_FILE, FORMAT_VERSION, MANIFEST_FILE
from .base import Curvature
from .strategies import make_curvature

READABLE_VERSIONS = (2, FORMAT_VERSION)  # 2: float64, one A per layer, no blocks: read as is


@dataclass
class Factors:
    """Fitted curvature for a set of tracked layers of one model.

    Attributes:
        config: the FactorConfig that produced them.
        curvature: the fitted strategy (holds per-layer tensors).
        num_tokens: real tokens seen in the fitting pass(es).
        num_sequences: training sequences seen.
        fingerprint: hash of the whole model's weights and buffers when it was
            fitted; scoring a model whose weights differ (any of them: tracked
            layers, embeddings, attention, norms) is refused.
        meta: free-form provenance (timings, versions).
    """

    config: FactorConfig
    curvature: Curvature
    num_tokens: int
    num_sequences: int
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, LayerInfo]:
        return self.curvature.layers

    @property
    def strategy(self) -> str:
        return self.curvature.name

    @property
    def nbytes(self) -> int:
        """Bytes of the fitted tensors (a shared tensor counted once), in memory or on disk when lazy."""
        if self.curvature.lazy:
            return _lazy_nbytes(self.curvature)
        return sum(t.numel() * t.element_size() for t in self.curvature.state_dict().values())

    def save(self, path: str | Path) -> Path:
        """Write factors.safetensors and manifest.json into the directory ``path``."""
        return save_factors(self, path)

    def check_model(self, model: nn.Module) -> dict[str, nn.Module]:
        """The tracked modules of ``model``; raises StaleError unless it is the model these factors were fitted on."""
        named = dict(model.named_modules())
        missing = [n for n in self.layers if n not in named]
        if missing:
            raise StaleError(f"the model has no module(s) {', '.join(missing[:4])} that these factors track")
        for n, info in self.layers.items():
            if layer_info(named[n]) != info:
                raise StaleError(f"module {n!r} is {layer_info(named[n])} in the model but {info} in the factors")
        fp = model_fingerprint(model)  # hashed only when a tensor was replaced or modified since the last call
        if fp != self.fingerprint:
            raise StaleError(
                f"these factors were fitted on a different model: its weights' fingerprint is {fp} but the "
                f"factors were fitted on {self.fingerprint}; refit the factors for this model"
            )
        return {n: named[n] for n in self.layers}


def tracked_modules(model: nn.Module, factors_or_patterns: Factors | tuple[str, ...] | None) -> dict[str, nn.Module]:
    """The modules to track: those of ``factors`` (checked against the model) or those the patterns name."""
    if isinstance(factors_or_patterns, Factors):
        return factors_or_patterns.check_model(model)
    return resolve_modules(model, factors_or_patterns)


def save_factors(factors: Factors, path: str | Path) -> Path:
    """Write ``factors`` into the directory ``path`` (tensors first, the manifest last).

    Layer-owned factors (``Execution(factor_placement="by_layer")``) are saved by every rank
    together: each sends its layers to rank 0, which writes the files a replicated fit writes.
    """
    from . import placement

    if placement.by_layer(factors.curvature):
        full = placement.gathered_curvature(factors.curvature)  # a collective: on every rank
        if full is None:
            return Path(path)
        factors = dataclasses.replace(factors, curvature=full)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in factors.curvature.state_dict().items()}
    atomic_write(path / FACTORS_FILE, lambda tmp: save_file(tensors, tmp))
    manifest = {
        "format_version": FORMAT_VERSION,
        "strategy": factors.strategy,
        "config": factors.config.to_dict(),
        "layers": {n: info.to_dict() for n, info in factors.layers.items()},
        "shared_a": factors.curvature.shared_a,
        "num_tokens": factors.num_tokens,
        "num_sequences": factors.num_sequences,
        "fingerprint": factors.fingerprint,
        "meta": factors.meta,
    }
    atomic_write_json(path / MANIFEST_FILE, manifest)  # written last: its presence marks completion
    return path


class SafetensorsSource(Mapping):
    """The tensors of a safetensors file, each read from the file when accessed (not kept).

    The file is opened for each read and closed after it: a handle kept open maps the
    whole file, and every page read stays resident in the process (1.2 GB of SmolLM2's
    factors after one preconditioning, counted in its peak memory).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity = _file_identity(path)
        with safe_open(str(path), framework="pt") as f:
            self._keys = list(f.keys())
            self._nbytes = 0
            for key in self._keys:
                s = f.get_slice(key)
                numel = 1
                for d in s.get_shape():
                    numel *= d
                self._nbytes += numel * _DTYPE_BYTES.get(s.get_dtype(), 4)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        # a copy in torch's own (64-byte aligned) memory: matrix products of the file's
        # 8-byte aligned buffer can round differently from those of the fitted tensors
        if _file_identity(self.path) != self._identity:
            raise StaleError(f"{self.path} changed after its factors were loaded lazily (fitted again?): load them again")
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key).clone()

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, read through one handle (closed after)."""
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k).clone() for k in self._keys}

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def nbytes(self) -> int:
        return self._nbytes


def _file_identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}


def _lazy_nbytes(curvature: Curvature) -> int:
    sources = {id(st.source): st.source for st in curvature.state.values() if hasattr(st, "source")}
    return sum(s.nbytes() for s in sources.values())


def load_factors(path: str | Path, model: nn.Module | None = None, *, lazy: bool = False) -> Factors:
    """Read factors saved by ``Factors.save``.

    Args:
        path: the directory holding manifest.json and factors.safetensors.
        model: when given, refuse factors fitted on a model with other weights (StaleError).
        lazy: leave the tensors in the file and read a layer's when it is used
            (memory for one layer at a time instead of all of them; the file must
            stay in place while the factors are in use).

    Raises:
        FileNotFoundError: no finished factors at ``path``.
        CorruptFileError: a file is truncated, from another format version, or inconsistent.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no factors at {path}: {MANIFEST_FILE} is missing (was the fit finished?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise CorruptFileError(
                f"{manifest_path}: format version {manifest.get('format_version')} is not {FORMAT_VERSION} "
                "(written by another lminfluence version): fit the factors again"
            )
        layers = {n: LayerInfo(**d) for n, d in manifest["layers"].items()}
        config = FactorConfig.from_dict(manifest["config"])
        curvature = make_curvature(manifest["strategy"], layers, config)
        tensor_path = path / FACTORS_FILE
        if not tensor_path.is_file():
            raise FileNotFoundError(f"no factors at {path}: {FACTORS_FILE} is missing next to {MANIFEST_FILE}")
        source = SafetensorsSource(tensor_path)
        tensors: Mapping[str, torch.Tensor] = source if lazy else source.read_all()
        curvature.load_state_dict(tensors, manifest.get("shared_a") or {}, lazy=lazy)
        factors = Factors(
            config=config,
            curvature=curvature,
            num_tokens=int(manifest["num_tokens"]),
            num_sequences=int(manifest["num_sequences"]),
            fingerprint=str(manifest["fingerprint"]),
            meta=manifest.get("meta", {}),
        )
    except CorruptFileError:
        raise
    except (json.JSONDecodeError, SafetensorError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptFileError(f"the factors in {path} cannot be read ({type(e).__name__}: {e}); fit them again") from e
    if model is not None:
        factors.check_model(model)
    return factors


__all__ = ["Factors", "tracked_modules", "save_factors", "load_factors"]
