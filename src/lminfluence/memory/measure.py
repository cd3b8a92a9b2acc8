"""Measuring what the plan cannot compute from shapes: a pass's activations, the device's speed, free memory."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..passes import half_autocast, model_device, run_pass, tracking


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the CPU tensors created while active (by storage; views count once).

    Every operator's outputs are recorded with a weak reference to their
    storage, unless they share an input's storage (a view, an in-place
    result); a storage counts until it is freed. Tensors that existed before
    (the model's weights) are not counted. Used on the CPU, where torch keeps
    no allocator statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in inputs:
                self._add(t)
        return out

    def _add(self, t: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = t.untyped_storage()
        key = storage.data_ptr()
        old = self.live.get(key)
        if old is not None and not old[0].expired():
            return
        if old is not None:
            self.current -= old[1]
        size = storage.nbytes()
        self.live[key] = (StorageWeakRef(storage), size)
        self.current += size
        if self.current > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.current)

    def _sweep(self) -> None:
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= size


def process_bytes(device: torch.device) -> int:
    """What this process holds now: CUDA allocated memory, or resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def available_bytes(device: torch.device) -> int:
    """What the device can still give: free CUDA memory, or the system's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def example_length(example: Mapping[str, Any]) -> int:
    """Positions of an example: its ``input_ids``' length (1 for examples without token ids)."""
    return len(example["input_ids"]) if "input_ids" in example else 1


def synthetic_example(model: nn.Module, length: int, prompt: int = 0) -> dict[str, torch.Tensor]:
    """Token ids of ``length`` (labels -100 on the first ``prompt`` positions) for probing a causal LM."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    ids = torch.arange(length) * 7919 % vocab
    labels = ids.clone()
    labels[:prompt] = -100
    return {"input_ids": ids, "labels": labels}


@dataclass
class Probe:
    """One sequence through a pass of the library: the bytes its tensors peaked at, its time, shared inputs."""

    bytes_per_sequence: int
    seconds_per_sequence: float
    tokens: int
    shared_a: dict[str, str] = field(default_factory=dict)


_PROBES: dict[tuple, Probe] = {}  # the last probes of this process, by model state, layers, task, example size


def probe(model: nn.Module, task: Any, modules: dict[str, nn.Module], example: Mapping[str, Any], loss_kind: str) -> Probe:
    """Run one example through ``run_pass`` (forward, loss, backward to the tracked outputs, captures).

    The result is reused for the same model weights, tracked layers, task, loss and example length
    (a long job planning each of its chunks probes once).
    """
    from ..fingerprint import model_version_key

    key = (id(model), model_version_key(model), tuple(modules), type(task).__qualname__, loss_kind, example_length(example))
    if key not in _PROBES:
        if len(_PROBES) > 16:
            _PROBES.clear()
        _PROBES[key] = _probe(model, task, modules, example, loss_kind)
    return _PROBES[key]


def _probe(model: nn.Module, task: Any, modules: dict[str, nn.Module], example: Mapping[str, Any], loss_kind: str) -> Probe:
    device = model_device(model)
    shared: dict[str, str] = {}

    def once() -> None:
        with tracking(model, modules) as col:
            for bc in run_pass(model, task, col, [example], 1, loss_kind, seed=0, autocast=half_autocast(model)):  # type: ignore[arg-type]
                first: dict[int, str] = {}
                for name, cap in bc.captures.items():
                    owner = first.setdefault(id(cap.a), name)
                    if owner != name:
                        shared[name] = owner

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        once()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        tracker = TensorMemoryTracker()
        with tracker:
            once()
        peak = tracker.peak
        seconds = math.inf
        for _ in range(2):  # timed again without the tracker's bookkeeping; the faster of two runs
            start = time.perf_counter()
            once()
            seconds = min(seconds, time.perf_counter() - start)
    return Probe(peak, seconds, example_length(example), shared)


_MEASURED: dict[tuple[str, str], float] = {}  # device speeds, measured once per process


def device_speed(what: str, device: torch.device) -> float:
    """A speed of this device, measured once per process.

    ``matmul``: multiply-add throughput, flop/s (a 1024³ float32 product, best of three);
    ``eigh``: seconds of one float64 eigendecomposition of a 256 × 256 matrix (others scale with d³).
    """
    key = (what, str(device))
    if key not in _MEASURED:
        _MEASURED[key] = _matmul_rate(device) if what == "matmul" else _eigh_seconds(device)
    return _MEASURED[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_rate(device: torch.device) -> float:
    x = torch.randn(1024, 1024, device=device)
    best = math.inf
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        x @ x
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / max(best, 1e-9)


def _eigh_seconds(device: torch.device) -> float:
    from ..curvature.math import eigh_many

    x = torch.randn(256, 256, dtype=torch.float64, device=device)
    x = x @ x.T
    eigh_many([x])
    _sync(device)
    start = time.perf_counter()
    eigh_many([x])
    _sync(device)
    return time.perf_counter() - start


__all__ = [
    "TensorMemoryTracker",
    "process_bytes",
    "available_bytes",
    "example_length",
    "synthetic_example",
    "Probe",
    "probe",
    "device_speed",
]
