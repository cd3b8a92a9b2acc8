"""Building a gradient index: one pass over the training sequences, compressed gradients into shards.

The pass is the scoring pass (true labels, summed loss; docs/method.md §5)
without any query: per batch and tracked layer the captures (ā, ds) are
encoded by the index's codec and packed into the storage dtype; each finished
shard is written atomically. A rerun of an interrupted build skips the shards
that exist and computes the missing ones exactly as an uninterrupted build
would (same pieces, same batches), so it ends with the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Execution, check_positive_int
from ..curvature import placement
from ..curvature.factors import Factors, tracked_modules
from ..errors import ConfigError, InputError, StaleError
from ..hooks.collector import LayerCapture
from ..passes import model_device, run_pass, tracking
from ..scoring.pairwise import _size
from ..scoring.two_stage import subset
from ..task.base import Task
from .codecs import LayerBasis, pack
from .config import IndexConfig
from .plan import GradientIndex, IndexPlan
from .store import IndexFiles, Shard, examples_digest, remove_temporary_files

logger = logging.getLogger(__name__)

BatchObserver = Callable[[np.ndarray, dict[str, LayerCapture]], None]


def missing_pieces(shards: list[Shard], n: int, size: int) -> list[tuple[int, int]]:
    """The ranges [start, end) still to build: in each cell [c·size, (c+1)·size) ∩ [0, n), the gaps between shards."""
    out = []
    for c0 in range(0, n, size):
        c1 = min(c0 + size, n)
        pos = c0
        for s in shards:
            if s.end <= c0 or s.start >= c1:
                continue
            if s.start > pos:
                out.append((pos, s.start))
            pos = max(pos, s.end)
        if pos < c1:
            out.append((pos, c1))
    return out


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the captures come in: the model's, at least float32 (hooks/collector.py)."""
    for p in model.parameters():
        return torch.promote_types(p.dtype, torch.float32)
    return torch.float32


def _check_existing(files: IndexFiles, train: Any) -> list[Shard]:
    shards = files.shards()
    n = len(train)
    for s in shards:
        if s.end > n:
            raise StaleError(
                f"the gradient index at {files.path} holds sequences up to {s.end - 1} but the data has {n}: "
                "the corpus changed; delete the index or build into another directory"
            )
        if files.shard_metadata(s)["examples"] != examples_digest(subset(train, range(s.start, s.end))):
            raise StaleError(
                f"sequences {s.start}..{s.end - 1} of the data differ from those in the gradient index at {files.path} "
                "(the corpus changed); delete the index or build into another directory"
            )
    return shards


def build_index(
    model: nn.Module,
    factors: Factors,
    train: Iterable[Mapping[str, Any]],
    path: str | Path,
    config: IndexConfig = IndexConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
    rank: int = 0,
    world_size: int = 1,
    on_batch: BatchObserver | None = None,
) -> GradientIndex | None:
    """Index every sequence of ``train`` not yet indexed at ``path`` (docs/index.md).

    Appending: call again with a longer ``train`` whose first sequences are the indexed ones.
    Resuming: call again after an interruption; finished shards are kept.

    Args:
        model, factors: the model and its fitted EK-FAC (or K-FAC, diagonal) factors.
        train: the indexable training sequences (example dicts, as for ``compute_scores``).
        path: the index directory (created; an index of other settings or factors there is refused).
        config: compression, size and storage type.
        execution: batch size of the pass (None: from the memory plan; give it to make a resumed
            build's batches, hence its bytes, those of an uninterrupted one on any machine).
        rank, world_size: this process's share under data parallelism: the shards of cells c with
            c mod world_size = rank.
        on_batch: called with the sequence positions [B] and captures of every batch of the pass
            (to compute other statistics from the same pass, as the benchmark does).

    Returns:
        The opened index when ``world_size`` is 1 (every shard is then written), else None.

    Raises:
        StaleError: the directory holds an index of other factors, settings or sequences.
    """
    from ..task.causal_lm import CausalLMTask

    check_positive_int("world_size", world_size)
    if placement.by_layer(factors.curvature):  # the index stores every layer's projection of each sequence
        raise placement.refuse("build_index")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    task = task or CausalLMTask()
    modules = tracked_modules(model, factors)
    if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
        train = list(train)
    if len(train) == 0:  # type: ignore[arg-type]
        raise InputError("no training sequences to index")
    plan = IndexPlan.of(factors, config)
    files = IndexFiles.create(path, plan.manifest(factors))
    if world_size == 1:  # no other process can be writing: temporary files are leftovers of a killed build
        remove_temporary_files(files.path)
    size = plan.sequences_per_shard
    pieces = [p for p in missing_pieces(_check_existing(files, train), len(train), size) if (p[0] // size) % world_size == rank]  # type: ignore[arg-type]
    if pieces and execution.batch_size is None:
        from ..config import ScoreConfig
        from ..scoring.pairwise import _sizes

        execution, _ = _sizes(model, factors, ScoreConfig(), execution, task, train=train, stages=("score",))
    if pieces:
        logger.info("index %s: %d shard(s) to build on rank %d, %s bytes per sequence", files.path, len(pieces), rank, f"{plan.bytes_per_sequence:,}")
        like = torch.empty(0, dtype=compute_dtype(model), device=model_device(model))
        bases = {n: LayerBasis.of(factors.curvature, n, like) for n in modules}
        aux = {n: {k: t.to(like.device) for k, t in d.items()} for n, d in plan.aux.items()}
        with tracking(model, modules) as col:
            for start, end in pieces:
                parts: dict[str, list[torch.Tensor]] = {}
                pos = start
                rows = subset(train, np.arange(start, end))
                for bc in run_pass(model, task, col, rows, _size(execution.batch_size), "true", desc=f"index {start}-{end - 1}"):
                    for name, cap in bc.captures.items():
                        encoded = plan.codecs[name].encode(cap.a, cap.ds, bases[name], aux[name])
                        for key, t in pack(encoded, plan.storage_dtype).items():
                            parts.setdefault(f"{name}::{key}", []).append(t)
                    if on_batch is not None:
                        on_batch(np.arange(pos, pos + bc.num_sequences), bc.captures)
                    pos += bc.num_sequences
                files.write_shard(start, end, {k: torch.cat(v) for k, v in parts.items()}, examples_digest(rows))
    return GradientIndex.open(files.path) if world_size == 1 else None


__all__ = ["build_index", "missing_pieces", "compute_dtype", "BatchObserver"]
