"""Checkpoints of a fit in progress, so that a killed fit resumes where it stopped.

A checkpoint is the curvature's whole state (float64 running sums, the
eigenbases of finished passes) plus where the fit is: pass, next sequence,
counts, batch size. It lives in ``OUTPUT/checkpoint/``: the tensors in
``state-N.safetensors`` written first, then ``checkpoint.json`` (atomically
replaced) naming that file, then older state files deleted. A kill at any
moment leaves either the previous checkpoint or the new one, never a mix.

Each sequence's sampled labels come from its own seed and the batches of a
resumed pass start where the checkpoint left them, so a resumed fit adds up
exactly the same numbers in the same order: its factors are bitwise equal to
an uninterrupted fit's. The checkpoint is keyed by a digest of everything the
factors depend on (the model's weights, the configuration, the task, the
training examples, the tracked layers); when any differs it is discarded.

Under ``torch.distributed`` each rank checkpoints its own shard's sums in
``checkpoint/rank-R-of-W/``. A rank killed after the collective end of a pass
but before saving it restarts one pass behind the others: ``agree`` hands it
the finished passes' state (the same on every rank) from a rank ahead.
With layer-owned factors (``InStepCheckpoint``) the ranks' checkpoints are
valid only together: the ranks save at the same batches, each keeps its
previous checkpoint too, and all resume from the latest one every rank holds.

For tests, ``LMINFLUENCE_TEST_KILL_AT=batch:K`` makes the process kill itself
(SIGKILL) after the K-th batch it accumulates, ``checkpoint:K`` in the middle
of writing its K-th checkpoint (state written, json not yet); with
``LMINFLUENCE_TEST_KILL_RANK=R`` only the process of rank R does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import distributed as dist
from ..storage.atomic import atomic_write, atomic_write_json
from .base import Curvature

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1
KILL_ENV = "LMINFLUENCE_TEST_KILL_AT"
KILL_RANK_ENV = "LMINFLUENCE_TEST_KILL_RANK"


def test_kill(point: str, count: int) -> None:
    """SIGKILL this process when ``LMINFLUENCE_TEST_KILL_AT`` is ``point:count`` (crash-safety tests only)."""
    if os.environ.get(KILL_ENV) == f"{point}:{count}" and os.environ.get(KILL_RANK_ENV, str(dist.rank())) == str(dist.rank()):
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(output_dir: Path) -> Path:
    """Where this process checkpoints a fit whose output is ``output_dir`` (one folder per rank under torch.distributed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    return root / f"rank-{dist.rank()}-of-{dist.world_size()}" if dist.active() else root


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)) and not (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
        try:
            t = torch.as_tensor(value)
            h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
            return
        except (TypeError, ValueError, RuntimeError):
            pass
    h.update(repr(value).encode())


def _write_tensors(path: Path, curvature: Curvature) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in curvature.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def examples_digest(data: Iterable[Mapping[str, Any]]) -> str:
    """A hash of every example's keys and values, in order."""
    h = hashlib.sha256()
    for i, ex in enumerate(data):
        h.update(f"#{i}".encode())
        for key in sorted(ex):
            h.update(f"{key}=".encode())
            _hash_value(h, ex[key])
    return h.hexdigest()[:32]


def fit_key(parts: Mapping[str, Any]) -> str:
    """A hash of everything a fit's factors depend on (a JSON-able mapping)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class Progress:
    """Where a fit is: the pass running (its index), the next sequence of that pass, and its counts."""

    pass_index: int = 0
    start: int = 0
    num_tokens: int = 0
    num_sequences: int = 0
    batch_size: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class FitCheckpoint:
    """Saves and restores a fit's state in ``directory``, keyed by ``key``, at most every ``interval`` seconds."""

    def __init__(self, directory: Path, key: str, interval: float) -> None:
        self.directory, self.key, self.interval = Path(directory), key, interval
        self.last = time.monotonic()
        self.saves = 0

    def restore(self, curvature: Curvature) -> Progress | None:
        """Load the checkpoint into ``curvature``; None (and the stale files removed) when there is none for this key."""
        meta = self._read()
        if meta is None:
            return None
        try:
            flat = load_file(str(self.directory / meta["file"]))
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            logger.warning("ignoring an unreadable checkpoint in %s (%s)", self.directory, e)
            self.clear()
            return None
        return self._apply(curvature, meta, flat)

    def _read(self) -> dict[str, Any] | None:
        """The checkpoint's json when it belongs to this key (else None, the stale files removed)."""
        path = self.directory / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
            if meta.get("format") == CHECKPOINT_FORMAT and meta.get("key") == self.key:
                return meta
            logger.info("ignoring the checkpoint in %s: it belongs to other inputs (model, data or settings)", self.directory)
        except (OSError, ValueError) as e:
            logger.warning("ignoring an unreadable checkpoint in %s (%s)", self.directory, e)
        self.clear()
        return None

    def _apply(self, curvature: Curvature, entry: Mapping[str, Any], flat: Mapping[str, torch.Tensor]) -> Progress:
        """Load one saved state (``flat``, the tensors of a json entry: file, shared_a, dtype, progress) into ``curvature``."""
        curvature.load_state_dict(flat, entry.get("shared_a") or {})
        curvature.dtype = getattr(torch, entry["dtype"]) if entry.get("dtype") else None
        progress = Progress(**entry["progress"])
        logger.info("resuming the fit from its checkpoint: pass %d, sequence %d", progress.pass_index + 1, progress.start)
        return progress

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def save(self, curvature: Curvature, progress: Progress) -> None:
        """Write the state, then the json naming it (atomically), then drop older states."""
        self.saves += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"state-{self.saves:06d}-{os.getpid()}.safetensors"
        _write_tensors(self.directory / name, curvature)
        test_kill("checkpoint", self.saves)
        entry = {
            "file": name,
            "shared_a": curvature.shared_a,
            "dtype": str(curvature.dtype).removeprefix("torch.") if curvature.dtype is not None else None,
            "progress": asdict(progress),
        }
        self._commit(curvature, entry)
        self.last = time.monotonic()

    def _commit(self, curvature: Curvature, entry: dict[str, Any]) -> None:
        atomic_write_json(self.directory / CHECKPOINT_FILE, {"format": CHECKPOINT_FORMAT, "key": self.key, **entry})
        self._drop_states(keep={entry["file"]})

    def _drop_states(self, keep: set[str]) -> None:
        for old in self.directory.glob("state-*.safetensors"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class InStepCheckpoint(FitCheckpoint):
    """The per-rank checkpoints of a fit with layer-owned factors (``placement``): valid only together.

    Each rank's sums hold every rank's captures of the rank's own layers, so the
    ranks must resume from the same batch. They save at the same batches (rank
    0's clock decides, ``due`` is a collective), number their checkpoints alike
    (``generation``) and each keeps its previous one besides its latest: a rank
    killed while saving leaves the others at most one checkpoint ahead, and
    ``restore`` (a collective) loads on every rank the latest generation that
    every rank holds. The owners of the layers are saved with the state.
    """

    def __init__(self, directory: Path, key: str, interval: float) -> None:
        super().__init__(directory, key, interval)
        self.current: dict[str, Any] | None = None  # the entry this rank resumed from or saved last

    def due(self) -> bool:
        """Rank 0's ``due`` on every rank (a collective: call it on every rank after each batch)."""
        return bool(dist.broadcast_object(super().due() if dist.is_main() else None, 0))

    def restore(self, curvature: Curvature) -> Progress | None:
        """Load the latest generation that every rank holds (a collective); None on every rank when there is none."""
        meta = self._read()
        saved: list[dict[str, Any]] = [e for e in (meta, (meta or {}).get("previous")) if e]
        entries = [{k: v for k, v in e.items() if k not in ("format", "key", "previous")} for e in saved]
        held = dist.all_gather_objects([e.get("generation") for e in entries])
        common = set(held[0]).intersection(*held[1:])
        common.discard(None)
        entry = next((e for e in entries if e.get("generation") == max(common)), None) if common else None
        flat, error = None, None
        if entry is not None:
            try:
                flat = load_file(str(self.directory / entry["file"]))
            except (OSError, ValueError, SafetensorError) as e:
                error = f"{type(e).__name__}: {e}"
        outcomes = dist.all_gather_objects((error, entry.get("owners") if entry else None))
        failed = [f"rank {r}: {err}" for r, (err, _) in enumerate(outcomes) if err]
        if entry is None or failed or any(owners != outcomes[0][1] for _, owners in outcomes):
            if meta is not None:
                logger.warning("the ranks' checkpoints do not resume together (%s): the fit starts over", "; ".join(failed) or "no common one")
            self.clear()
            self.current = None
            return None
        progress = self._apply(curvature, entry, flat or {})
        curvature.own(entry["owners"], dist.rank())
        self.current = entry
        return progress

    def _commit(self, curvature: Curvature, entry: dict[str, Any]) -> None:
        previous = self.current
        entry.update(generation=(previous["generation"] + 1) if previous else 1, owners=curvature.owners)
        atomic_write_json(self.directory / CHECKPOINT_FILE, {"format": CHECKPOINT_FORMAT, "key": self.key, **entry, "previous": previous})
        self._drop_states(keep={entry["file"]} | ({previous["file"]} if previous else set()))
        self.current = entry


def agree(curvature: Curvature, progress: Progress | None) -> Progress | None:
    """Make every rank start in the same pass (call on every rank after ``restore``).

    Ranks can be at most one pass apart: a pass ends with collectives every rank joins, and a
    rank may die after them but before checkpointing the pass's end. Ranks behind take the
    finished passes' state (equal on every rank: broadcast eigenbases, summed Λ) from the first
    rank ahead and start the pass from their shard's beginning; ranks ahead keep their progress.
    """
    if not dist.active():
        return progress
    passes = dist.all_gather_objects(progress.pass_index if progress is not None else 0)
    ahead = max(passes)
    if min(passes) == ahead:
        return progress
    src = passes.index(ahead)
    finished = {k: v for k, v in curvature.state_dict().items() if "_sum" not in k} if dist.rank() == src else {}
    meta = dist.broadcast_object(
        {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in finished.items()} | {"": (curvature.shared_a, str(curvature.dtype))}
        if dist.rank() == src else None,
        src,
    )  # fmt: skip
    shared_a, dtype = meta.pop("")
    tensors = {k: finished[k].cpu() if k in finished else torch.empty(shape, dtype=getattr(torch, d)) for k, (shape, d) in meta.items()}
    dist.broadcast_(list(tensors.values()), src)
    if passes[dist.rank()] == ahead:
        return progress
    logger.info("rank %d resumes at pass %d with the state of rank %d (it stopped before checkpointing the end of pass %d)", dist.rank(), ahead + 1, src, ahead)
    curvature.load_state_dict(tensors, shared_a)
    curvature.dtype = getattr(torch, dtype.removeprefix("torch."))
    batch_size = progress.batch_size if progress is not None else 0
    return Progress(pass_index=ahead, batch_size=batch_size)


__all__ = [
    "FitCheckpoint", "InStepCheckpoint", "Progress", "agree", "checkpoint_dir", "examples_digest", "fit_key", "test_kill",
    "CHECKPOINT_DIR", "KILL_ENV", "KILL_RANK_ENV",
]  # fmt: skip
