"""Answering queries from a gradient index: the queries' gradients only, no pass over training data.

``score_with_index`` computes each query's gradient, preconditions it
(Eq 21) and contracts it with every indexed sequence, layer by layer, one
shard at a time. ``two_stage_with_index`` is the paper's procedure with the
index in place of the scan: the index ranks, each query's top and bottom are
re-scored at full rank by the model, and the shown sequences get per-layer and
per-token scores (scoring/two_stage.py does both).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Execution, ScoreConfig
from ..curvature import placement
from ..curvature.factors import Factors, tracked_modules
from ..errors import ConfigError
from ..filtering.tfidf import TfidfIndex
from ..passes import as_reiterable, run_pass, tracking
from ..scoring.pairwise import SCALE_NOTE, Scores, _size, _sizes, layer_dampings
from ..scoring.two_stage import ChunkStore, MemoryStore, TwoStageConfig, TwoStageResult, _Run, select_candidates
from ..task.base import Task
from .codecs import LayerBasis, QueryGradients, unpack
from .plan import GradientIndex

logger = logging.getLogger(__name__)


def _opened(index: GradientIndex | str | Path) -> GradientIndex:
    return index if isinstance(index, GradientIndex) else GradientIndex.open(index)


def score_with_index(
    model: nn.Module,
    factors: Factors,
    index: GradientIndex | str | Path,
    queries: Iterable[Mapping[str, Any]],
    config: ScoreConfig = ScoreConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
    train: Any = None,
) -> Scores:
    """Influence of every indexed sequence on every query, [Q, N], from the index (Eq 25).

    Exact with ``method="full"`` (up to the storage dtype); otherwise the
    approximation of the index's compression (docs/index.md). Damping is the
    scoring ``config``'s, as for ``compute_scores``.

    Args:
        index: an index built with these ``factors`` (or its directory).
        config: damping and ``per_layer``; ``query_rank`` and ``per_token`` do not apply
            (per-token scores need the model over the sequences: ``two_stage_with_index``).
        execution: ``query_batch_size`` queries per gradient pass (None: from the memory plan).
        train: when given, the indexed sequences are checked against it (StaleError if they differ).

    Raises:
        StaleError: the index was built for another model or other factors, or from other sequences.
        CorruptFileError: a shard is damaged or missing.
    """
    from ..task.causal_lm import CausalLMTask

    if config.query_rank is not None or config.per_token:
        raise ConfigError("scoring from an index takes no query_rank and no per_token (re-score the top with two_stage_with_index)")
    if placement.by_layer(factors.curvature):
        raise placement.refuse("score_with_index")
    index = _opened(index)
    task = task or CausalLMTask()
    modules = tracked_modules(model, factors)
    plan = index.check(factors)
    if train is not None:
        index.check_examples(train)
    dampings = layer_dampings(factors, config)
    queries = as_reiterable(queries, "queries")
    if execution.query_batch_size is None:
        execution, _ = _sizes(model, factors, config, execution, task, queries=queries, stages=("precondition",))
    captures: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    with tracking(model, modules) as col:
        for bc in run_pass(model, task, col, queries, _size(execution.query_batch_size), "measurement", desc="queries"):
            captures.append({n: (c.a.detach(), c.ds.detach()) for n, c in bc.captures.items()})
    dtype = next(iter(captures[0].values()))[0].dtype
    Q = sum(next(iter(c.values()))[0].shape[0] for c in captures)
    total = torch.zeros(Q, index.num_sequences, dtype=dtype)
    per_layer: dict[str, torch.Tensor] = {}
    for name in modules:
        codec, aux = plan.codecs[name], plan.aux[name]
        like = captures[0][name][0]
        basis = LayerBasis.of(factors.curvature, name, like)
        aux_here = {k: t.to(like.device) for k, t in aux.items()}
        prepared = codec.join([codec.prepare(QueryGradients(c[name][0], c[name][1], basis, dampings[name]), aux_here) for c in captures])
        layer = torch.zeros_like(total)
        for shard in index.shards:
            arrays = {k: t.to(like.device) for k, t in unpack(index.read(shard, name), dtype).items()}
            layer[:, shard.start : shard.end] = codec.score(prepared, arrays).cpu()
        total += layer
        if config.per_layer:
            per_layer[name] = layer
    meta = {
        "strategy": factors.strategy,
        "damping": dampings,
        "query_rank": None,
        "train_size": factors.num_sequences,
        "scale": SCALE_NOTE,
        "index": {"path": str(index.path), "method": index.config.method, "reduction": index.config.reduction, "bytes_per_sequence": index.bytes_per_sequence},
    }
    return Scores(total=total, per_layer=per_layer if config.per_layer else None, meta=meta)


def two_stage_with_index(
    model: nn.Module,
    factors: Factors,
    index: GradientIndex | str | Path,
    queries: Iterable[Mapping[str, Any]],
    train: Any,
    config: ScoreConfig = ScoreConfig(),
    stages: TwoStageConfig = TwoStageConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
    store: ChunkStore | None = None,
    tfidf: TfidfIndex | None = None,
    chunk_size: int = 1024,
) -> TwoStageResult:
    """The two-stage procedure with the index as its first stage (scoring/two_stage.py).

    The index scores every indexed sequence (restricted to each query's TF-IDF
    candidates when ``stages.candidates`` is set); with ``stages.rescore_top`` each
    query's top and bottom M are re-scored at full rank by the model; the shown
    sequences get per-layer and per-token scores from the model (at full rank,
    or at ``config.query_rank`` when nothing is re-scored).

    Args:
        train: the indexable training set the index was built from (checked).
        execution: batch sizes (None: from the memory plan).
        store: where finished re-score and detail chunks go (keyed by the caller).
        tfidf: a prebuilt TF-IDF index over the indexed sequences (built here when needed and None).
        chunk_size: the re-scoring's unit of resuming, as for ``two_stage_scores``.
    """
    from ..task.causal_lm import CausalLMTask

    if placement.by_layer(factors.curvature):
        raise placement.refuse("two_stage_with_index")
    queries = list(queries)
    if not queries:
        raise ConfigError("no queries to score")
    if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
        train = list(train)
    index = _opened(index)
    task = task or CausalLMTask()
    if execution.batch_size is None or execution.query_batch_size is None:  # sizes left automatic: from the memory plan
        execution, _ = _sizes(model, factors, config, execution, task, train=train, queries=queries, stages=("precondition", "score"))
    scan_config = ScoreConfig(damping_scale=config.damping_scale, damping=config.damping)
    scores = score_with_index(model, factors, index, queries, scan_config, task=task, execution=execution, train=train)
    first = scores.total.double().numpy()  # [Q, N]
    union, tfidf_scores, mask = select_candidates(tfidf, subset_or_all(train, index.num_sequences), queries, stages.candidates)
    first = np.where(mask, first[:, union], np.nan)
    run = _Run(model, factors, queries, train, config, stages, task, execution, store or MemoryStore(), chunk_size)
    if stages.rescore_top:
        final, choice = run.rescore(union, first)
        detail_rank = None
    else:
        final, choice, detail_rank = first, first, config.query_rank
    shown = run.details(union, choice, detail_rank)
    meta = {**scores.meta, "damping": layer_dampings(factors, config), "query_rank": config.query_rank}
    return TwoStageResult(columns=union, first=first, final=final, tfidf=tfidf_scores, shown=shown, meta=meta)


def subset_or_all(train: Any, n: int) -> Any:
    """The first ``n`` sequences of ``train`` (all of it when it has exactly n)."""
    from ..scoring.two_stage import subset

    return train if len(train) == n else subset(train, np.arange(n))


__all__ = ["score_with_index", "two_stage_with_index"]
