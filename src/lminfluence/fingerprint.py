"""Content fingerprints: which model (all its weights), which tokenizer, so stale results are refused."""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# Parameters and buffers hashed per update: a 540 MB float32 model hashes in about a second
_CHUNK = 1 << 24


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of names, shapes and values (as float32 on the CPU, so independent of device and of a lossless dtype change)."""
    h = hashlib.sha256()
    for name, t in named:
        t = _full(t.detach())
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), _CHUNK):
            part = flat[i : i + _CHUNK]
            part = part.to(device="cpu", dtype=torch.float32) if part.is_floating_point() else part.to("cpu")
            h.update(part.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (FSDP's sharded parameters; a collective: every rank calls it)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def model_version_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (cheap; no hashing)."""
    return tuple((n, _local(t).data_ptr(), t._version) for n, t in model.state_dict(keep_vars=True).items())


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (version key, fingerprint)


def model_fingerprint(model: nn.Module) -> str:
    """The fingerprint of every parameter and persistent buffer of ``model`` (its whole state_dict).

    Hashed once per state of the model: a later call on unchanged tensors returns the cached value.
    """
    key = model_version_key(model)
    cached = _cache.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    fp = tensors_fingerprint(model.state_dict().items())
    _cache[model] = (key, fp)
    return fp


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the fast tokenizer's full definition, or vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps([sorted(tokenizer.get_vocab().items()), getattr(tokenizer, "all_special_tokens", [])], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


__all__ = ["tensors_fingerprint", "model_fingerprint", "model_version_key", "tokenizer_fingerprint"]
