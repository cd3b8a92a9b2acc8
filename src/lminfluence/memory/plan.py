"""The plan: each stage's peak memory by component, its time, and the batch sizes that fit the budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..config import Execution, FactorConfig, ScoreConfig
from ..curvature.math import CHUNK_ELEMENTS, OVERSAMPLE, block_slices
from ..errors import ConfigError
from ..hooks.modules import LayerInfo, layer_info
from ..passes import model_device
from .measure import available_bytes, device_speed, example_length, probe, process_bytes, synthetic_example

GiB = 2**30
AVAILABLE_SHARE = 0.9  # of the memory the system reports available, when the budget is automatic
MAX_QUERY_BATCH = 64
# Tokens per batch beyond which a batch is no faster per token, only larger. On CPUs a plain
# training pass ran fastest at about 1,000 tokens per batch (bench_core: up to 2x slower at
# 4,000). Every stage uses the same size: rank-R scoring must not run smaller, slower batches
# than full rank.
TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 16384}
# Work per batch (about 6 × parameters × tokens for a forward and backward pass) beyond which a
# CPU batch is no faster per token: the per-batch fixed costs (Python, hooks, per-layer calls)
# are then under a few percent. A real model reaches it with one sequence (SmolLM2-135M: 207
# GFLOP at 256 tokens, 20.9 / 21.8 / 23.5 ms per token with 1 / 2 / 4 sequences); a small one
# needs the token cap's full batch (bench_core's 6M-parameter Llama: 8 sequences of 128).
WORK_PER_BATCH = {"cpu": 64e9}
# Shares of the budget that automatic sizes may spend on what only buys speed, so that it does
# not crowd out what a stage needs (query gradients, factors): a batch's activations (training
# or query) and EK-FAC's capture cache (it saves recomputing the first pass in the second).
BATCH_SHARE = 1 / 16
CACHE_SHARE = 1 / 4
HELD = "held now (model, runtime, loaded data)"


@dataclass
class Stage:
    """One stage's peak: bytes by component, and an estimate of its time."""

    name: str
    parts: dict[str, int]
    seconds: float | None = None

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    """Memory of each stage, the batch sizes chosen, and estimates of time (see ``report``)."""

    device: str
    budget: int
    budget_source: str
    fit_batch_size: int
    score_batch_size: int
    query_batch_size: int
    cache_bytes: int
    query_group: int
    stages: dict[str, Stage]
    sizes: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.peak <= self.budget for s in self.stages.values())

    @property
    def batch_size(self) -> int:
        """The fit's batch size when a fit is planned, else the scoring's."""
        return self.fit_batch_size if "fit" in self.stages else self.score_batch_size

    def execution(self, execution: Execution = Execution(), stage: str = "score") -> Execution:
        """``execution`` with its automatic sizes filled in from this plan (the batch size of ``stage``: fit or score)."""
        return replace(
            execution,
            batch_size=execution.batch_size or (self.fit_batch_size if stage == "fit" else self.score_batch_size),
            query_batch_size=execution.query_batch_size or self.query_batch_size,
            cache_gib=execution.cache_gib if execution.cache_gib is not None else self.cache_bytes / GiB,
        )

    def report(self) -> str:
        """A printable table: each stage's peak by component, its time, the sizes chosen."""
        sizes = []
        if "fit" in self.stages:
            sizes.append(f"fit batch size {self.fit_batch_size}")
            sizes.append(f"EK-FAC capture cache {self.cache_bytes / GiB:.2f} GiB" if self.cache_bytes else "no capture cache")
        if any(s in self.stages for s in ("precondition", "score")):
            sizes.append(f"scoring batch size {self.score_batch_size}, query batch size {self.query_batch_size}")
        lines = [f"memory budget {self.budget / GiB:.2f} GiB ({self.budget_source}) on {self.device}; " + ", ".join(sizes)]
        for stage in self.stages.values():
            mark = "" if stage.peak <= self.budget else "   <- over the budget"
            time_text = f", ~{_duration(stage.seconds)}" if stage.seconds is not None else ""
            lines.append(f"  {stage.name}: peak ~{stage.peak / GiB:.2f} GiB{time_text}{mark}")
            lines.extend(f"      {part:<48}{size / GiB:>8.2f} GiB" for part, size in stage.parts.items() if size >= 1 << 20)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def memory_budget(device: torch.device, execution: Execution, held: int | None = None) -> tuple[int, str]:
    """The budget in bytes and where it comes from: ``memory_gib``, or what the device has plus what the process holds."""
    if execution.memory_gib is not None:
        return int(execution.memory_gib * GiB), "memory_gib"
    held = process_bytes(device) if held is None else held
    kind = "GPU memory" if device.type == "cuda" else "RAM"
    return held + int(AVAILABLE_SHARE * available_bytes(device)), f"{AVAILABLE_SHARE:.0%} of available {kind} + this process's {held / GiB:.2f} GiB"


def headroom(device: torch.device, execution: Execution) -> int:
    """Bytes the budget leaves above what the process holds now."""
    held = process_bytes(device)
    return max(0, memory_budget(device, execution, held)[0] - held)


def _block_sizes(dim: int, blocks: int) -> list[int]:
    return [s.stop - s.start for s in block_slices(dim, blocks)]


@dataclass
class _Weights:
    """What each part of a run weighs, in bytes, and what its time depends on."""

    held: int
    act: int  # activations and captures of one training sequence (the probe)
    act_query: int
    probe_seconds: float
    seq_len: int
    query_len: int
    num_sequences: int
    num_queries: int
    strategy: str
    rank: int | None
    compute: int  # bytes per element of the captures
    layers: dict[str, LayerInfo]
    sizes: dict[str, int]
    factors_held: int
    factors_transient: int
    max_dim: int
    max_oi: int
    rate: float
    eigh_seconds: float
    eigh_width: int

    @property
    def eigen(self) -> bool:
        return self.strategy in ("kfac", "ekfac")

    @property
    def oi(self) -> int:
        return sum(i.out_dim * i.in_dim for i in self.layers.values())


def _weigh(model, task, modules, cfg, strategy, factors, score_config, num_sequences, seq_len, num_queries, query_len, example, query_example) -> _Weights:
    device = model_device(model)
    infos = {n: layer_info(m) for n, m in modules.items()}
    sampled = strategy != "identity" and cfg.fisher == "sampled"
    train_probe = probe(model, task, modules, example or synthetic_example(model, seq_len), "sampled" if sampled else "true")
    q_len = example_length(query_example) if query_example is not None else query_len
    if query_example is None:
        act_q = int(train_probe.bytes_per_sequence * q_len / max(seq_len, 1))
    else:
        act_q = probe(model, task, modules, query_example, "measurement").bytes_per_sequence
    shared = dict(getattr(getattr(factors, "curvature", None), "shared_a", {}) or train_probe.shared_a)
    owners = [n for n in infos if n not in shared]
    compute = 8 if next(model.parameters()).dtype == torch.float64 else 4
    store = compute if cfg.factor_dtype == "auto" else (8 if cfg.factor_dtype == "float64" else 4)
    blocks, eigen = cfg.blocks, strategy in ("kfac", "ekfac")
    a_dims = [infos[n].in_dim for n in owners]
    s_dims = [i.out_dim for i in infos.values()]
    squares = sum(d * d for dim in a_dims + s_dims for d in _block_sizes(dim, blocks))
    triangles = sum(d * (d + 1) // 2 for dim in a_dims + s_dims for d in _block_sizes(dim, blocks))
    oi = sum(i.out_dim * i.in_dim for i in infos.values())
    sizes = {
        "sums": 8 * triangles if eigen else 0,
        "bases": (store + (compute if store != compute else 0)) * squares + store * (sum(a_dims) + sum(s_dims)) if eigen else 0,
        "lambda": store * oi if strategy != "identity" else 0,
        "lambda_sums": 8 * oi if strategy in ("ekfac", "diagonal", "lissa") else 0,
        "captures_per_sequence": compute * seq_len * (sum(a_dims) + sum(s_dims)),
        "activations_per_sequence": train_probe.bytes_per_sequence,
        "query_activations_per_sequence": act_q,
    }
    if factors is None:  # a plan before the fit: the scoring process will load them
        held_f, transient_f = sizes["bases"] + sizes["lambda"], 0
    elif factors.curvature.lazy:  # read from the file one layer at a time
        per_layer = [sum(d * d for dim in (i.in_dim, i.out_dim) for d in _block_sizes(dim, blocks)) + i.out_dim * i.in_dim for i in infos.values()]
        held_f, transient_f = 0, store * max(per_layer)
    else:  # already in memory: part of what the process holds now
        held_f, transient_f = 0, 0
    eigh_s = 0.0
    if eigen:
        eigh_s = device_speed("eigh", device) * sum((d / 256) ** 3 for dim in a_dims + s_dims for d in _block_sizes(dim, blocks))
    return _Weights(
        held=process_bytes(device),
        act=train_probe.bytes_per_sequence,
        act_query=act_q,
        probe_seconds=train_probe.seconds_per_sequence,
        seq_len=seq_len,
        query_len=q_len,
        num_sequences=num_sequences,
        num_queries=num_queries,
        strategy=strategy,
        rank=score_config.query_rank,
        compute=compute,
        layers=infos,
        sizes=sizes,
        factors_held=held_f,
        factors_transient=transient_f,
        max_dim=max(max(_block_sizes(d, blocks)) for d in a_dims + s_dims),
        max_oi=max(i.out_dim * i.in_dim for i in infos.values()),
        rate=device_speed("matmul", device),
        eigh_seconds=eigh_s,
        eigh_width=torch.get_num_threads() if device.type == "cpu" else 1,
    )


def _fit_stage(w: _Weights, batch: int, cache: int) -> Stage:
    """The largest of the first pass, the eigendecompositions and the second pass."""
    two_pass, d2 = w.strategy == "ekfac", w.max_dim**2
    first = {
        HELD: w.held,
        f"activations and captures of a batch of {batch}": batch * w.act,
        "float64 sums of A and S (packed triangles)": w.sizes["sums"] if w.eigen else w.sizes["lambda_sums"],
        "covariance workspace": w.compute * d2 * 3 // 2 if w.eigen else 0,  # a product and its packed triangle
        "EK-FAC capture cache": cache,
    }
    # side-by-side decompositions: each a mean and its eigenvectors (float64), the unpacking
    # temporaries of one, and LAPACK's own workspace (2·D² doubles) per decomposition
    decompose = {
        HELD: w.held,
        "float64 sums of A and S (packed triangles)": w.sizes["sums"],
        "eigendecomposition workspace": (2 * w.eigh_width + 3) * 8 * d2 + w.eigh_width * 16 * d2,
        "EK-FAC capture cache": cache,
    }
    second = {
        HELD: w.held,
        f"activations and captures of a batch of {batch}": 0 if cache else batch * w.act,
        "eigenbases and eigenvalues": w.sizes["bases"],
        "float64 sums of Λ": w.sizes["lambda_sums"],
        "eigenbasis rotation workspace": 12 * w.max_oi + w.compute * batch * w.seq_len * w.max_dim * 2 + 8 * min(batch * w.max_oi, CHUNK_ELEMENTS),
        "EK-FAC capture cache": cache,
    }
    peaks = [first] + ([decompose] if w.eigen else []) + ([second] if two_pass or w.strategy == "diagonal" else [])
    passes = 2 if two_pass else 1
    tokens = w.num_sequences * w.seq_len
    a_s = w.sizes["sums"] / 8 * 2  # products per token of the covariances ≈ Σ D²
    flops = tokens * 2 * a_s if w.eigen else 0
    flops += tokens * 2 * (a_s + w.oi) if two_pass else 0
    recompute = passes - (1 if cache and two_pass else 0)
    seconds = recompute * w.num_sequences * w.probe_seconds + flops / w.rate + w.eigh_seconds
    return Stage("fit", max(peaks, key=lambda p: sum(p.values())), seconds)


def _precondition_stage(w: _Weights, qbatch: int, group: int) -> Stage:
    p_per_query = w.compute * sum(_p_elements(i, w.rank) for i in w.layers.values())
    parts = {
        HELD: w.held,
        "factors": w.factors_held + w.factors_transient,
        f"query activations and captures of a batch of {qbatch}": qbatch * w.act_query,
        f"preconditioned gradients of {group} queries": group * p_per_query,
        "per-layer query workspace": w.compute * qbatch * w.max_oi * (3 if w.rank is None else 2),
    }
    k = (w.rank or 0) + OVERSAMPLE
    per_query = sum(
        2 * i.out_dim * i.in_dim * (i.out_dim + i.in_dim) if w.rank is None else 12 * i.out_dim * i.in_dim * k for i in w.layers.values()
    )
    seconds = w.num_queries * (w.probe_seconds * w.query_len / max(w.seq_len, 1) + per_query / w.rate)
    return Stage("precondition queries", parts, seconds)


def _score_stage(w: _Weights, batch: int, group: int, preconditioned: bool) -> Stage:
    p_per_query = 0 if preconditioned else w.compute * sum(_p_elements(i, w.rank) for i in w.layers.values())
    parts = {
        HELD: w.held,
        "factors": w.factors_held,
        f"preconditioned gradients of {group} queries": group * p_per_query,
        f"activations and captures of a batch of {batch}": batch * w.act,
        "per-sequence gradients (one chunk at a time)": w.compute * min(batch * w.max_oi, CHUNK_ELEMENTS),
        "a layer's expanded rank-R queries": w.compute * group * w.max_oi if w.rank is not None else 0,
        "scores": 4 * w.num_queries * w.num_sequences,
    }
    groups = math.ceil(w.num_queries / max(group, 1)) if w.num_queries else 1
    tokens = w.num_sequences * w.seq_len
    flops = groups * tokens * 2 * w.oi + w.num_sequences * w.num_queries * 2 * w.oi
    seconds = groups * w.num_sequences * w.probe_seconds + flops / w.rate
    return Stage("score", parts, seconds)


def _p_elements(info: LayerInfo, rank: int | None) -> int:
    """Elements of one query's preconditioned gradient for a layer: dense O·I, or rank-R factors."""
    O, I = info.out_dim, info.in_dim
    if rank is None or rank >= min(O, I):
        return O * I
    return rank * (O + I + 1)


def plan(
    model: nn.Module,
    factor_config: FactorConfig = FactorConfig(),
    execution: Execution = Execution(),
    *,
    num_sequences: int,
    seq_len: int,
    num_queries: int = 0,
    query_len: int = 64,
    score_config: ScoreConfig | None = None,
    task: Any = None,
    factors: Any = None,
    example: Mapping[str, Any] | None = None,
    query_example: Mapping[str, Any] | None = None,
    stages: tuple[str, ...] = ("fit", "precondition", "score"),
    preconditioned: bool = False,
) -> Plan:
    """Estimate every stage's memory and time, and pick the sizes ``execution`` leaves automatic.

    Args:
        model: the model, on the device it will run on.
        factor_config: the factors to fit (their strategy, layers, blocks, dtype).
        execution: explicit sizes are kept; None ones are chosen here.
        num_sequences, seq_len: the training data (seq_len: its longest sequence).
        num_queries, query_len: the queries to score (query_len: the longest).
        score_config: the scoring settings (query rank); default ScoreConfig().
        task: the Task (default CausalLMTask); other tasks must give ``example``.
        factors: fitted Factors, when scoring them (their size and laziness are used).
        example, query_example: an example to probe with (default: synthetic token ids).
        stages: which stages to plan ("fit", "precondition", "score").
        preconditioned: the queries' preconditioned gradients are already in memory (held now).

    Raises:
        ConfigError: ``execution.memory_gib`` was given and not even batches of
            one sequence fit in it.
    """
    from ..curvature.factors import tracked_modules
    from ..task.causal_lm import CausalLMTask

    task = task or CausalLMTask()
    if example is None and not isinstance(task, CausalLMTask):
        raise ConfigError("plan: give an example to probe a custom task with")
    device = model_device(model)
    modules = tracked_modules(model, factors if factors is not None else factor_config.modules)
    cfg = factors.config if factors is not None else factor_config
    strategy = factors.strategy if factors is not None else factor_config.strategy
    w = _weigh(
        model, task, modules, cfg, strategy, factors, score_config or ScoreConfig(),
        num_sequences, seq_len, num_queries, query_len, example, query_example,
    )
    budget, source = memory_budget(device, execution, w.held)
    params = sum(p.numel() for p in model.parameters())

    def cap(table: dict[str, int]) -> int:
        by_tokens = table.get(device.type, 1024) // max(seq_len, 1)
        by_memory = int(BATCH_SHARE * budget) // max(w.act, 1)
        work = WORK_PER_BATCH.get(device.type)
        by_work = math.ceil(work / (6 * params * max(seq_len, 1))) if work else by_tokens
        return max(1, min(num_sequences, by_tokens, by_memory, by_work))

    def largest(limit: int, fits) -> int:
        """The largest batch size up to ``limit`` that fits (or the one given)."""
        candidates = [execution.batch_size] if execution.batch_size else list(range(limit, 0, -1))
        return next((b for b in candidates if fits(b)), candidates[-1])

    notes: list[str] = []
    group = num_queries
    while group > 1 and "score" in stages and _score_stage(w, 1, group, preconditioned).peak > budget:
        group = max(1, group // 2)
    if num_queries and group < num_queries:
        notes.append(
            f"the preconditioned gradients of all {num_queries} queries do not fit: they are scored in groups of {group} "
            f"(one pass over the data per group); a query rank (e.g. 32) keeps them small"
        )
    qcap = max(1, min(max(num_queries, 1), MAX_QUERY_BATCH, int(BATCH_SHARE * budget) // max(w.act_query, 1)))
    qcands = [execution.query_batch_size] if execution.query_batch_size else list(range(qcap, 0, -1))
    qbatch = next((q for q in qcands if "precondition" not in stages or _precondition_stage(w, q, max(group, 1)).peak <= budget), qcands[-1])
    fit_batch = largest(cap(TOKENS_PER_BATCH), lambda b: "fit" not in stages or _fit_stage(w, b, 0).peak <= budget)
    score_batch = largest(cap(TOKENS_PER_BATCH), lambda b: "score" not in stages or _score_stage(w, b, group, preconditioned).peak <= budget)
    cache = 0
    if strategy == "ekfac" and "fit" in stages:
        want = num_sequences * w.sizes["captures_per_sequence"]
        if execution.cache_gib is not None:
            cache = want if want <= execution.cache_gib * GiB else 0
        elif want <= CACHE_SHARE * budget and _fit_stage(w, fit_batch, want).peak <= budget:
            cache = want

    planned = {}
    if "fit" in stages and strategy != "identity":
        planned["fit"] = _fit_stage(w, fit_batch, cache)
    if "precondition" in stages and num_queries:
        planned["precondition"] = _precondition_stage(w, qbatch, group)
    if "score" in stages:
        planned["score"] = _score_stage(w, score_batch, group, preconditioned)
    result = Plan(str(device), budget, source, fit_batch, score_batch, qbatch, cache, group, planned, w.sizes, notes)
    if not result.fits:
        message = (
            f"even batches of {min(fit_batch, score_batch)} sequence(s) need more than the {budget / GiB:.2f} GiB budget; "
            "track fewer layers (FactorConfig.modules), cut A and S into blocks (FactorConfig.blocks), "
            "use a query rank, shorter sequences, or a larger memory_gib"
        )
        if execution.memory_gib is not None:
            raise ConfigError(message + "\n" + result.report())
        result.notes.append(message)
    return result


def _lengths(data: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(number of examples, longest example) of a dataset."""
    n = longest = 0
    for ex in data:
        n += 1
        longest = max(longest, example_length(ex))
    return n, longest


def plan_for_data(
    model: nn.Module,
    factor_config: FactorConfig,
    execution: Execution,
    train: Iterable[Mapping[str, Any]],
    *,
    queries: Iterable[Mapping[str, Any]] | None = None,
    score_config: ScoreConfig | None = None,
    task: Any = None,
    factors: Any = None,
    stages: tuple[str, ...] = ("fit",),
    preconditioned: bool = False,
) -> Plan:
    """``plan`` with the sizes read from the data (one pass over it, no model); probes with its longest examples."""
    from ..task.causal_lm import CausalLMTask

    n, longest = _lengths(train)
    nq, qlen = _lengths(queries) if queries is not None else (0, 0)
    example = query_example = None
    if task is not None and not isinstance(task, CausalLMTask):  # a custom task: probe with its own examples
        example = max(train, key=example_length) if n else max(queries or [], key=example_length)
        query_example = max(queries, key=example_length) if nq else None  # type: ignore[arg-type]
    return plan(
        model, factor_config, execution, num_sequences=max(n, 1), seq_len=max(longest, qlen, 2), num_queries=nq,
        query_len=max(qlen, 2), score_config=score_config, task=task, factors=factors, example=example,
        query_example=query_example, stages=stages, preconditioned=preconditioned,
    )


__all__ = ["plan", "plan_for_data", "Plan", "Stage", "memory_budget", "headroom", "TOKENS_PER_BATCH", "WORK_PER_BATCH", "BATCH_SHARE", "CACHE_SHARE"]
