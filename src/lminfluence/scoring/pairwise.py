"""Pairwise influence scores, per-layer and per-token decompositions, self-influence."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..config import Execution, ScoreConfig
from ..curvature import placement
from ..curvature.factors import Factors, tracked_modules
from ..errors import InputError
from ..memory import headroom
from ..passes import as_reiterable, half_autocast, model_device, num_examples, run_pass, tracking
from ..task.base import Task
from .contract import LayerQueries, choose, layer_scores, worth_keeping
from .precondition import make_preconditioner

logger = logging.getLogger(__name__)

SCALE_NOTE = (
    "raw influence: first-order change of log p(completion | prompt) per unit up-weighting of the "
    "training sequence in the mean training objective; positive = the sequence raises the probability. "
    "Divide by train_size for the effect of adding one copy of the sequence."
)


@dataclass
class Scores:
    """Influence scores (docs/method.md §1: positive = raises log p(completion)).

    Attributes:
        total: [Q, N] for pairwise scores, [N] for self-influence.
        per_layer: layer name → same shape as ``total`` (Eq 30), when asked for.
        per_token: [Q, N, T] (Eq 31), when asked for; token t's term belongs to
            input position t (the token before the one it predicts); padding is 0.
        meta: strategy, damping per layer, query rank, train_size, the scale note.
    """

    total: torch.Tensor
    per_layer: dict[str, torch.Tensor] | None = None
    per_token: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def top_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest scores of each query and their training indices, [Q, min(k, N)] each."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        return torch.topk(self.total, min(k, self.total.shape[-1]), dim=-1)


def layer_dampings(factors: Factors, config: ScoreConfig) -> dict[str, float]:
    """λ of every tracked layer: ``config.damping`` or ``damping_scale`` × the layer's mean eigenvalue.

    The identity strategy applies no damping and reports 0 rather than a number that played no part.
    """
    if factors.strategy == "identity":
        return {n: 0.0 for n in factors.layers}
    return {n: config.damping_for(factors.curvature.mean_eigenvalue(n)) for n in factors.layers}


def _setup(model: nn.Module, factors: Factors, config: ScoreConfig, task: Task | None):
    from ..task.causal_lm import CausalLMTask

    if not isinstance(config, ScoreConfig):
        raise TypeError(f"config must be a ScoreConfig, got {type(config).__name__}")
    modules = tracked_modules(model, factors)
    dampings = layer_dampings(factors, config)
    meta = {
        "strategy": factors.strategy,
        "damping": dampings,
        "query_rank": config.query_rank,
        "train_size": factors.num_sequences,
        "scale": SCALE_NOTE,
    }
    return modules, dampings, task or CausalLMTask(), meta


def _sizes(
    model: nn.Module,
    factors: Factors,
    config: ScoreConfig,
    execution: Execution,
    task: Task,
    *,
    train: Any = None,
    queries: Any = None,
    stages: tuple[str, ...],
    preconditioned: bool = False,
):
    """``execution`` with the sizes it leaves automatic chosen by ``memory.plan``, and the plan (None when all are given)."""
    from ..memory import plan_for_data

    need_batch = "score" in stages and execution.batch_size is None
    need_queries = "precondition" in stages and execution.query_batch_size is None
    if not (need_batch or need_queries):
        return execution, None
    plan = plan_for_data(
        model, factors.config, execution, train if train is not None else [], queries=queries, score_config=config,
        task=task, factors=factors, stages=stages, preconditioned=preconditioned,
    )
    logger.info("scoring plan:\n%s", plan.report())
    return plan.execution(execution), plan


def _size(size: int | None) -> int:
    """A batch size that ``_sizes`` has resolved."""
    if size is None:
        raise RuntimeError("a batch size was left unresolved (a bug in lminfluence)")
    return size


def precondition_queries(
    model: nn.Module,
    factors: Factors,
    queries: Iterable[Mapping[str, Any]],
    config: ScoreConfig = ScoreConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
    curvature_data: Iterable[Mapping[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, LayerQueries]:
    """P = (G + λI)⁻¹ ∇g for each query and layer (g = -f), dense or rank-R (Eq 21, §3.2.2).

    Args:
        curvature_data: the training examples LiSSA draws its Gauss–Newton products from
            (needed, and only used, with ``strategy="lissa"`` or ``config.refine="cg"``).
        meta: when given, the preconditioner's diagnostics are added to it (LiSSA's α, μ̂_max).
    """
    modules, dampings, task, _ = _setup(model, factors, config, task)
    queries = as_reiterable(queries, "queries")
    refining = config.refine != "none" and curvature_data is not None  # CG's products pass over the training data
    owned = placement.by_layer(factors.curvature)
    if owned and (config.refine != "none" or factors.strategy == "lissa"):
        raise placement.refuse("refine='cg' (its products couple the layers)" if config.refine != "none" else "the lissa strategy")
    if owned:  # layer-owned factors: this rank preconditions its own layers only (every rank runs every query)
        dampings = {n: d for n, d in dampings.items() if n in factors.curvature.state}
    if execution.query_batch_size is None or (refining and execution.batch_size is None):
        stages = ("precondition", "score") if refining else ("precondition",)
        if refining and curvature_data is not None:
            curvature_data = as_reiterable(curvature_data, "curvature_data")
        execution, _ = _sizes(model, factors, config, execution, task, train=curvature_data if refining else None, queries=queries, stages=stages)
    if execution.offload_factors:  # no device copies of the factors kept: one layer at a time
        factors.curvature.offload = True
    batch_size = _size(execution.batch_size) if refining else execution.batch_size or 1
    pre = make_preconditioner(model, factors, dampings, config.query_rank, task, curvature_data, config, batch_size)
    with tracking(model, modules) as col:
        for bc in run_pass(model, task, col, queries, _size(execution.query_batch_size), "measurement", autocast=half_autocast(model), desc="queries"):
            for name in [n for n in bc.captures if n not in dampings]:
                del bc.captures[name]
            pre.add(bc.captures)  # the batch's own dict: what the preconditioner takes out of it is freed
    result = pre.result()  # LiSSA runs the model itself: only once the hooks are gone
    if meta is not None:
        meta.update(pre.describe())
    return result


def _pad_cat(chunks: list[torch.Tensor], dim_n: int) -> torch.Tensor:
    """Concatenate [..., b, T_b] chunks along the sequence axis, zero-padding T to the longest."""
    length = max(c.shape[-1] for c in chunks)
    return torch.cat([F.pad(c, (0, length - c.shape[-1])) for c in chunks], dim=dim_n)


def compute_scores(
    model: nn.Module,
    factors: Factors,
    queries: Iterable[Mapping[str, Any]],
    train: Iterable[Mapping[str, Any]],
    config: ScoreConfig = ScoreConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
    curvature_data: Iterable[Mapping[str, Any]] | None = None,
) -> Scores:
    """Influence of every training sequence on every query, [Q, N] (Eq 25).

    The queries are preconditioned once; the training data is then streamed in
    batches with one forward and one backward pass each, the backward reaching
    only the tracked layers' outputs (no parameter gradients). Memory does not
    grow with N beyond the result.
    With ``strategy="lissa"`` or ``config.refine="cg"`` the Gauss–Newton products
    are formed over ``curvature_data`` (default: ``train``).

    Under ``torch.distributed`` call it on every rank with the same arguments:
    each rank preconditions a share of the queries and broadcasts them, scores
    a contiguous share of ``train``, and every rank returns all the scores.
    With factors fitted with ``factor_placement="by_layer"`` each rank
    preconditions every query for its own layers only, and scores the
    sequences of every rank for those layers (``score_preconditioned``); the
    layers' scores are summed over ranks. Not with ``refine="cg"`` or LiSSA.
    """
    meta: dict[str, Any] = {}
    data = train if curvature_data is None else curvature_data
    queries = as_reiterable(queries, "queries")
    train = as_reiterable(train, "train")
    task = task or _setup(model, factors, config, task)[2]
    execution, plan = _sizes(model, factors, config, execution, task, train=train, queries=queries, stages=("precondition", "score"))
    group = plan.query_group if plan is not None and plan.query_group else None
    # under torch.distributed each rank planned from its own free memory: rank 0's sizes for all, so that
    # every rank runs the same query groups and collectives
    execution, group = dist.broadcast_object((execution, group))
    if group is None or group >= len(queries):  # type: ignore[arg-type]
        pq = _precondition_shared(model, factors, queries, config, task=task, execution=execution, curvature_data=data, meta=meta)
        scores = _score_shared(model, factors, pq, train, config, task=task, execution=execution)
    else:  # the preconditioned gradients of all queries do not fit: one pass over the data per group
        parts = []
        for start in range(0, len(queries), group):  # type: ignore[arg-type]
            some = [queries[i] for i in range(start, min(start + group, len(queries)))]  # type: ignore[index, arg-type]
            pq = _precondition_shared(model, factors, some, config, task=task, execution=execution, curvature_data=data, meta=meta)
            parts.append(_score_shared(model, factors, pq, train, config, task=task, execution=execution))
            del pq
        scores = _join_query_groups(parts)
    scores.meta.update(meta)
    return scores


def _precondition_shared(model, factors, queries, config, **kwargs) -> dict[str, LayerQueries]:
    """``precondition_queries``; under torch.distributed each rank solves every K-th query and all receive all."""
    if not dist.active() or dist.sharded_model(model) or placement.by_layer(factors.curvature):
        # FSDP: every rank runs every forward, so all precondition all; by_layer: each for its own layers
        return precondition_queries(model, factors, queries, config, **kwargs)
    from .two_stage import _share

    queries = list(queries)
    positions = dist.shard(list(range(len(queries))))
    with dist.checked():
        mine = precondition_queries(model, factors, [queries[i] for i in positions], config, **kwargs) if positions else None
    return _share(mine, positions, list(factors.layers), model_device(model))


def _local_train(train: Any) -> Any:
    """This rank's contiguous share of ``train`` (all of it in one process)."""
    if not dist.active():
        return train
    n = len(train) if hasattr(train, "__len__") else sum(1 for _ in train)
    if n < dist.world_size():
        raise InputError(f"train: {n} sequences for {dist.world_size()} processes; every process needs at least one (use fewer processes)")
    return dist.Slice(train, *dist.span(n))


def _score_shared(model, factors, pq, train, config, **kwargs) -> Scores:
    """``score_preconditioned``; under torch.distributed each rank scores its share of ``train``, all receive all scores."""
    if not dist.active():
        return score_preconditioned(model, factors, pq, train, config, **kwargs)
    local = _local_train(train)
    owned = placement.by_layer(factors.curvature)
    dist.require_same_batches(model, len(local), _size(kwargs["execution"].batch_size), "score", always=owned)
    if owned:  # the scores of every rank's sequences, already summed over the layers' owners
        return score_preconditioned(model, factors, pq, local, config, **kwargs)
    with dist.checked():
        mine = score_preconditioned(model, factors, pq, local, config, **kwargs)
    return Scores(
        total=dist.gather_cat(mine.total, 1),
        per_layer={n: dist.gather_cat(t, 1) for n, t in mine.per_layer.items()} if mine.per_layer is not None else None,
        per_token=dist.gather_cat(mine.per_token, 1, pad_dims=(2,)) if mine.per_token is not None else None,
        meta=mine.meta,
    )


def _join_query_groups(parts: list[Scores]) -> Scores:
    """Scores of consecutive query groups as one (queries along the first axis)."""
    first = parts[0]
    per_layer = {n: torch.cat([p.per_layer[n] for p in parts]) for n in first.per_layer} if first.per_layer is not None else None  # type: ignore[index]
    per_token = None
    if first.per_token is not None:
        length = max(p.per_token.shape[-1] for p in parts)  # type: ignore[union-attr]
        per_token = torch.cat([F.pad(p.per_token, (0, length - p.per_token.shape[-1])) for p in parts])  # type: ignore[union-attr, arg-type]
    return Scores(total=torch.cat([p.total for p in parts]), per_layer=per_layer, per_token=per_token, meta=first.meta)


def score_preconditioned(
    model: nn.Module,
    factors: Factors,
    preconditioned: Mapping[str, LayerQueries],
    train: Iterable[Mapping[str, Any]],
    config: ScoreConfig = ScoreConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
) -> Scores:
    """Score training sequences against queries already preconditioned by ``precondition_queries``.

    Lets a long job precondition its queries once and stream the training set
    in chunks (resume, candidate subsets). ``config`` must be the one the
    queries were preconditioned with (damping and rank are baked into them).
    It runs on this process's data only, also under torch.distributed, except
    with layer-owned factors (``factor_placement="by_layer"``): then every rank
    must call it with its own ``train`` and the same number of batches, and each
    returns the scores of every rank's ``train``, concatenated in rank order
    (each layer scored by its owner, which receives the others' captures).
    """
    modules, _, task, meta = _setup(model, factors, config, task)
    gather = placement.Gather(factors.curvature.owners) if placement.by_layer(factors.curvature) else None  # type: ignore[arg-type]
    held = set(modules) if gather is None else set(factors.curvature.state)
    missing = sorted(held - set(preconditioned))
    if missing:
        raise ValueError(f"preconditioned queries lack tracked layers: {', '.join(missing)}")
    pq = preconditioned
    train = as_reiterable(train, "train")
    execution, plan = _sizes(model, factors, config, execution, task, train=train, stages=("score",), preconditioned=True)
    if gather is not None:  # every rank exchanges captures after each batch: rank 0's sizes, and as many batches everywhere
        execution = dist.broadcast_object(execution)
        n = num_examples(train)
        dist.require_same_batches(model, sum(1 for _ in train) if n is None else n, _size(execution.batch_size), "score", always=True)
    # A rank-R layer whose contraction is much cheaper from its dense [Q, O, I] keeps that dense form
    # across batches, while it fits in what the budget leaves (decided at its first batch: ``worth_keeping``).
    spare = max(0, plan.budget - plan.stages["score"].peak) if plan is not None else headroom(model_device(model), execution) // 2
    keep: dict[str, bool] = {}
    totals: list[torch.Tensor] = []
    layer_parts: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    token_parts: list[torch.Tensor] = []
    columns = placement.OwnedScores(modules, config.per_layer, config.per_token, preconditioned, 1) if gather is not None else None
    with tracking(model, modules) as col:
        for bc in run_pass(model, task, col, train, _size(execution.batch_size), "true", autocast=half_autocast(model), desc="score"):
            batch_total: torch.Tensor | None = None
            batch_tokens: torch.Tensor | None = None
            captures = bc.captures if gather is None else gather([bc.captures])[0]  # by_layer: own layers, every rank's sequences
            layer_totals = {}
            for name, cap in captures.items():
                B, T, I = cap.a.shape
                if name not in keep:
                    lq = pq[name]
                    keep[name] = lq.dense is not None or (worth_keeping(lq, T, cap.ds.shape[-1], I, B) and lq.expanded_bytes <= spare)
                    spare -= lq.expanded_bytes if keep[name] and lq.dense is None else 0
                algorithm = choose(pq[name], T, cap.ds.shape[-1], I, config.per_token, config.algorithm, B, keep[name])
                tot, tok = layer_scores(pq[name], cap.a, cap.ds, algorithm, keep[name])
                batch_total = tot if batch_total is None else batch_total + tot
                layer_totals[name] = tot
                if config.per_layer and columns is None:
                    layer_parts[name].append(tot.cpu())
                if config.per_token:
                    if tok is None:
                        raise RuntimeError(f"no per-token scores from the {algorithm!r} algorithm (a bug in lminfluence)")
                    batch_tokens = tok if batch_tokens is None else batch_tokens + tok
            if columns is not None and gather is not None:
                columns.add(batch_total, layer_totals, batch_tokens, gather.sizes, next(iter(bc.captures.values())).a.dtype)
                continue
            if batch_total is None:
                raise RuntimeError("a training batch went through no tracked layer (a bug in lminfluence)")
            totals.append(batch_total.cpu())
            if config.per_token and batch_tokens is not None:
                token_parts.append(batch_tokens.cpu())
    if columns is not None:
        return Scores(*columns.result(), meta=meta)
    return Scores(
        total=torch.cat(totals, dim=1),
        per_layer={n: torch.cat(p, dim=1) for n, p in layer_parts.items()} if config.per_layer else None,
        per_token=_pad_cat(token_parts, 1) if config.per_token else None,
        meta=meta,
    )


def compute_self_scores(
    model: nn.Module,
    factors: Factors,
    train: Iterable[Mapping[str, Any]],
    config: ScoreConfig = ScoreConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
) -> Scores:
    """Self-influence ∇L(z)ᵀ (G + λI)⁻¹ ∇L(z) of every training sequence, [N].

    Large values flag outliers and memorised sequences. ``per_layer`` fills
    ``Scores.per_layer`` with [N] tensors; per-token self-influence is not defined.
    Under ``torch.distributed`` each rank scores a contiguous share of ``train``
    and every rank returns all the scores.
    """
    if config.per_token:
        raise InputError("per_token is not defined for self-influence; use per_layer")
    if config.refine != "none":
        raise InputError("refine applies to queries (one solve each), not to self-influence: use refine='none'")
    modules, dampings, task, meta = _setup(model, factors, config, task)
    train = _local_train(as_reiterable(train, "train"))
    if execution.batch_size is None:
        execution, _ = _sizes(model, factors, config, execution, task, train=train, stages=("score",), preconditioned=True)
        execution = dist.broadcast_object(execution)  # rank 0's plan for every rank (FSDP needs equal batches)
    owned = placement.by_layer(factors.curvature)
    if dist.sharded_model(model) or owned:
        dist.require_same_batches(model, len(train), _size(execution.batch_size), "self-influence", always=owned)  # type: ignore[arg-type]
    gather = placement.Gather(factors.curvature.owners) if owned else None  # type: ignore[arg-type]
    columns = placement.OwnedScores(modules, config.per_layer, False, None, 0) if owned else None
    curvature = factors.curvature
    if execution.offload_factors:
        curvature.offload = True
    totals: list[torch.Tensor] = []
    layer_parts: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    with dist.checked(), tracking(model, modules) as col:
        for bc in run_pass(model, task, col, train, _size(execution.batch_size), "true", autocast=half_autocast(model), desc="self-influence"):
            batch_total: torch.Tensor | None = None
            captures = bc.captures if gather is None else gather([bc.captures])[0]  # by_layer: own layers, every rank's sequences
            layer_totals = {}
            for name, cap in captures.items():
                tot = curvature.self_influence(name, cap.a, cap.ds, dampings[name])  # [B]
                batch_total = tot if batch_total is None else batch_total + tot
                layer_totals[name] = tot
                if config.per_layer and columns is None:
                    layer_parts[name].append(tot.cpu())
            if columns is not None and gather is not None:
                columns.add(batch_total, layer_totals, None, gather.sizes, next(iter(bc.captures.values())).a.dtype)
                continue
            if batch_total is None:
                raise RuntimeError("a training batch went through no tracked layer (a bug in lminfluence)")
            totals.append(batch_total.cpu())
    if columns is not None:
        return Scores(*columns.result(), meta=meta)
    return Scores(
        total=dist.gather_cat(torch.cat(totals), 0),
        per_layer={n: dist.gather_cat(torch.cat(p), 0) for n, p in layer_parts.items()} if config.per_layer else None,
        meta=meta,
    )


__all__ = ["Scores", "compute_scores", "compute_self_scores", "precondition_queries", "score_preconditioned", "layer_dampings", "SCALE_NOTE"]
