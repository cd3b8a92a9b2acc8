"""Memory and time a fit or a scoring run will need, before it runs, and batch sizes that fit a budget.

``plan`` adds up, per stage, what is held at its peak:

- what the process holds now (the model, the interpreter, anything loaded);
- the activations of one batch: measured, not guessed, by running the
  library's own pass on one sequence of the planned length (``probe``) and
  counting the bytes of the tensors it creates (CUDA: the allocator's peak;
  CPU: ``TensorMemoryTracker``), times the batch size;
- the captures kept for EK-FAC's second pass (``Execution.cache_gib``);
- the curvature's state, from the tracked layers' shapes: float64 running
  sums of A and S, the eigendecomposition's workspace, the eigenbases and
  eigenvalues in their storage dtype, the float64 sums of Λ;
- for scoring: the preconditioned query gradients (dense, or rank-R factors),
  the per-sequence gradients materialised per batch, the factors when held.

Batch sizes left at None in ``Execution`` are the largest whose peak fits the
budget, up to ``TOKENS_PER_BATCH`` tokens per batch (more buys no speed).
The budget is ``Execution.memory_gib`` or what the device has: free CUDA
memory, or the machine's available RAM, plus what the process already holds.
Times are rough estimates from the probe's time and a measured matrix
multiply rate.

Usage::

    p = lminfluence.memory.plan(model, FactorConfig(), Execution(), num_sequences=10_000, seq_len=512, num_queries=16)
    print(p.report())
    p.batch_size, p.query_batch_size
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .config import Execution, FactorConfig, ScoreConfig
from .curvature.math import CHUNK_ELEMENTS, OVERSAMPLE, block_slices
from .errors import ConfigError
from .hooks.modules import LayerInfo, layer_info
from .passes import model_device, run_pass, tracking

logger = logging.getLogger(__name__)

GiB = 2**30
# Tokens per batch beyond which a batch is no faster per token, only larger. On CPUs a plain
# training pass ran fastest at ~1,000 tokens per batch (bench_core: 2x slower at 4,000); rank-R
# scoring has no large per-batch reads to amortise (full-rank scoring reads every dense query
# gradient once per batch, fitting adds every covariance sum once per batch), so half that.
TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 16384}
LOW_RANK_TOKENS_PER_BATCH = {"cpu": 512, "cuda": 16384}
AVAILABLE_SHARE = 0.9  # of the memory the system reports available, when the budget is automatic
MAX_QUERY_BATCH = 64


# ------------------------------------------------------------ measuring


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensors created while active (by storage; views count once).

    Every operator's outputs are recorded with a weak reference to their
    storage; a storage counts until it is freed. Tensors that existed before
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
        # a view or an in-place result shares an input's storage: nothing new was allocated
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
        return 8 * GiB


@dataclass
class Probe:
    """One sequence through a pass of the library: the bytes its tensors peaked at, and its time."""

    bytes_per_sequence: int
    seconds_per_sequence: float
    tokens: int
    shared_a: dict[str, str] = field(default_factory=dict)


def probe(model: nn.Module, task: Any, modules: dict[str, nn.Module], example: Mapping[str, Any], loss_kind: str, *, autocast=None) -> Probe:
    """Run one example through ``run_pass`` (forward, loss, backward to the tracked outputs, captures)."""
    device = model_device(model)
    shared: dict[str, str] = {}

    def once() -> None:
        with tracking(model, modules) as col:
            for bc in run_pass(model, task, col, [example], 1, loss_kind, seed=0, autocast=autocast):  # type: ignore[arg-type]
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
    return Probe(peak, seconds, _length(example), shared)


_MEASURED: dict[tuple[str, str], float] = {}  # device speeds, measured once per process


def _once(what: str, device: torch.device, measure) -> float:
    key = (what, str(device))
    if key not in _MEASURED:
        _MEASURED[key] = measure(device)
    return _MEASURED[key]


def _matmul_rate(device: torch.device) -> float:
    """Multiply-add throughput of this device, flop/s (a 1024³ float32 product, best of three)."""
    x = torch.randn(1024, 1024, device=device)
    best = math.inf
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x @ x
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / max(best, 1e-9)


def _eigh_seconds(device: torch.device) -> float:
    """Seconds of one float64 eigendecomposition of a 256 × 256 matrix (others scale with d³)."""
    x = torch.randn(256, 256, dtype=torch.float64, device=device)
    x = x @ x.T
    torch.linalg.eigh(x)
    start = time.perf_counter()
    torch.linalg.eigh(x)
    return time.perf_counter() - start


# ------------------------------------------------------------- the plan


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
        from dataclasses import replace

        return replace(
            execution,
            batch_size=execution.batch_size or (self.fit_batch_size if stage == "fit" else self.score_batch_size),
            query_batch_size=execution.query_batch_size or self.query_batch_size,
            cache_gib=execution.cache_gib if execution.cache_gib is not None else self.cache_bytes / GiB,
        )

    def report(self) -> str:
        """A printable table: each stage's peak by component, its time, the sizes chosen."""
        lines = [
            f"memory budget {self.budget / GiB:.2f} GiB ({self.budget_source}) on {self.device}; "
            + (f"fit batch size {self.fit_batch_size}, " if "fit" in self.stages else "")
            + (f"scoring batch size {self.score_batch_size}, query batch size {self.query_batch_size}" if len(self.stages) > ("fit" in self.stages) else "").rstrip(", ")
            + (f", EK-FAC capture cache {self.cache_bytes / GiB:.2f} GiB" if self.cache_bytes else ", no capture cache"),
        ]
        for stage in self.stages.values():
            mark = "" if stage.peak <= self.budget else "   ← over the budget"
            time_text = f", ~{_duration(stage.seconds)}" if stage.seconds is not None else ""
            lines.append(f"  {stage.name}: peak ~{stage.peak / GiB:.2f} GiB{time_text}{mark}")
            for part, size in stage.parts.items():
                if size >= 1 << 20:
                    lines.append(f"      {part:<44}{size / GiB:>8.2f} GiB")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


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


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _squares(dim: int, blocks: int) -> int:
    """Elements of a (block-diagonal) dim × dim factor: Σ d_b²."""
    return sum((s.stop - s.start) ** 2 for s in block_slices(dim, blocks))


def _triangles(dim: int, blocks: int) -> int:
    """Elements of the packed upper triangles of a (block-diagonal) dim × dim sum: Σ d_b(d_b + 1)/2."""
    return sum((s.stop - s.start) * (s.stop - s.start + 1) // 2 for s in block_slices(dim, blocks))


def _p_elements(info: LayerInfo, rank: int | None) -> int:
    """Elements of one query's preconditioned gradient for a layer: dense O·I, or rank-R factors."""
    O, I = info.out_dim, info.in_dim
    if rank is None or rank >= min(O, I):
        return O * I
    return rank * (O + I + 1)


def synthetic_example(model: nn.Module, length: int, prompt: int = 0) -> dict[str, torch.Tensor]:
    """Token ids of ``length`` (labels -100 on the first ``prompt`` positions) for probing a causal LM."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    ids = torch.arange(length) * 7919 % vocab
    labels = ids.clone()
    labels[:prompt] = -100
    return {"input_ids": ids, "labels": labels}


def _length(example: Mapping[str, Any]) -> int:
    """Positions of an example: its ``input_ids``' length (1 for examples without token ids)."""
    return len(example["input_ids"]) if "input_ids" in example else 1


def _lengths(data: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(number of examples, longest example) of a dataset."""
    n = longest = 0
    for ex in data:
        n += 1
        longest = max(longest, _length(ex))
    return n, longest


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
    from .curvature.factors import tracked_modules
    from .task.causal_lm import CausalLMTask

    score_config = score_config or ScoreConfig()
    task = task or CausalLMTask()
    device = model_device(model)
    modules = tracked_modules(model, factors if factors is not None else factor_config.modules)
    infos = {n: layer_info(m) for n, m in modules.items()}
    strategy = factors.strategy if factors is not None else factor_config.strategy
    cfg = factors.config if factors is not None else factor_config

    held = process_bytes(device)
    budget, source = memory_budget(device, execution, held)

    if example is None and not isinstance(task, CausalLMTask):
        raise ConfigError("plan: give an example to probe a custom task with")
    autocast = half_autocast(model)
    sampled = strategy != "identity" and factor_config.fisher == "sampled"
    train_probe = probe(model, task, modules, example or synthetic_example(model, seq_len), "sampled" if sampled else "true", autocast=autocast)
    shared = dict(getattr(getattr(factors, "curvature", None), "shared_a", {}) or train_probe.shared_a)
    owners = [n for n in infos if n not in shared]
    compute = 8 if next(model.parameters()).dtype == torch.float64 else 4
    store = compute if cfg.factor_dtype == "auto" else (8 if cfg.factor_dtype == "float64" else 4)
    blocks = cfg.blocks
    act = train_probe.bytes_per_sequence
    q_len = _length(query_example) if query_example is not None else query_len
    act_q = int(act * q_len / max(seq_len, 1)) if query_example is None else probe(model, task, modules, query_example, "measurement", autocast=autocast).bytes_per_sequence

    cov_a = sum(_squares(infos[n].in_dim, blocks) for n in owners)
    cov_s = sum(_squares(i.out_dim, blocks) for i in infos.values())
    oi = sum(i.out_dim * i.in_dim for i in infos.values())
    max_oi = max(i.out_dim * i.in_dim for i in infos.values())
    max_dim = max(max(s.stop - s.start for s in block_slices(d, blocks)) for i in infos.values() for d in (i.in_dim, i.out_dim))
    vectors = sum(infos[n].in_dim for n in owners) + sum(i.out_dim for i in infos.values())
    eigen = strategy in ("kfac", "ekfac")
    two_pass = strategy == "ekfac"
    packed = sum(_triangles(infos[n].in_dim, blocks) for n in owners) + sum(_triangles(i.out_dim, blocks) for i in infos.values())
    sizes = {
        "sums": 8 * packed if eigen else 0,
        "bases": store * (cov_a + cov_s + vectors) if eigen else 0,
        "lambda": store * oi if strategy != "identity" else 0,
        "lambda_sums": 8 * oi if strategy in ("ekfac", "diagonal", "lissa") else 0,
        "captures_per_sequence": compute * seq_len * (sum(infos[n].in_dim for n in owners) + sum(i.out_dim for i in infos.values())),
        "activations_per_sequence": act,
        "query_activations_per_sequence": act_q,
    }
    if store != compute and eigen:
        sizes["bases"] += compute * (cov_a + cov_s)  # the bases converted to the compute dtype, kept for reuse
    factor_bytes = sizes["bases"] + sizes["lambda"]
    if factors is None:  # a plan before the fit: the scoring process will load them
        factors_held, factors_transient = factor_bytes, 0
    elif factors.curvature.lazy:  # read from disk one layer at a time
        per_layer = max(store * (_squares(i.in_dim, blocks) + _squares(i.out_dim, blocks) + i.out_dim * i.in_dim) for i in infos.values())
        factors_held, factors_transient = 0, per_layer
    else:  # already in memory: part of what the process holds now
        factors_held, factors_transient = 0, 0

    rate = _once("matmul", device, _matmul_rate)
    eigh256 = _once("eigh", device, _eigh_seconds) if eigen else 0.0
    tokens = num_sequences * seq_len
    eigh_s = eigh256 * sum(
        ((s.stop - s.start) / 256) ** 3
        for n, i in infos.items()
        for d in ((i.in_dim,) if n in owners else ()) + (i.out_dim,)
        for s in block_slices(d, blocks)
    )

    def cap(table: dict[str, int]) -> int:
        return max(1, min(num_sequences, table.get(device.type, 1024) // max(seq_len, 1)))

    eigh_width = torch.get_num_threads() if device.type == "cpu" else 1  # eigendecompositions run side by side

    def fit_stage(batch: int, cache: int) -> Stage:
        pass1 = {
            "held now (model, runtime, loaded data)": held,
            f"activations and captures of a batch of {batch}": batch * act,
            "float64 sums of A and S": sizes["sums"] if eigen else sizes["lambda_sums"],
            "covariance workspace": compute * max_dim**2 * 3 // 2 if eigen else 0,  # a product and its packed triangle
            "EK-FAC capture cache": cache,
        }
        finalize = {
            "held now (model, runtime, loaded data)": held,
            "float64 sums of A and S": sizes["sums"],
            # side-by-side decompositions: each a mean and its eigenvectors (float64), the unpacking
            # temporaries of one, and LAPACK's own workspace (2·D² doubles) per decomposition
            "eigendecomposition workspace": (2 * eigh_width + 3) * 8 * max_dim**2 + eigh_width * 16 * max_dim**2,
            "EK-FAC capture cache": cache,
        }
        pass2 = {
            "held now (model, runtime, loaded data)": held,
            f"activations and captures of a batch of {batch}": 0 if cache else batch * act,
            "eigenbases and eigenvalues": sizes["bases"],
            "float64 sums of Λ": sizes["lambda_sums"],
            "eigenbasis rotation workspace": 12 * max_oi + compute * batch * seq_len * max_dim * 2 + 8 * min(batch * max_oi, CHUNK_ELEMENTS),
            "EK-FAC capture cache": cache,
        }
        peaks = [pass1] + ([finalize] if eigen else []) + ([pass2] if two_pass or strategy == "diagonal" else [])
        worst = max(peaks, key=lambda p: sum(p.values()))
        passes = 2 if two_pass else (1 if strategy != "identity" else 0)
        flops = tokens * 2 * (cov_a + cov_s) * 10 / 16 if eigen else 0
        flops += tokens * 2 * (cov_a + cov_s + oi) if two_pass else 0
        recompute = passes - (1 if cache and two_pass else 0)
        seconds = recompute * num_sequences * train_probe.seconds_per_sequence + flops / rate + eigh_s
        return Stage("fit", worst, seconds)

    rank = score_config.query_rank
    p_per_query = 0 if preconditioned else compute * sum(_p_elements(i, rank) for i in infos.values())

    def precondition_stage(qbatch: int, group: int) -> Stage:
        work = compute * qbatch * max_oi * (3 if rank is None else 2)
        parts = {
            "held now (model, runtime, loaded data)": held,
            "factors": factors_held + factors_transient,
            f"query activations and captures of a batch of {qbatch}": qbatch * act_q,
            f"preconditioned gradients of {group} queries": group * p_per_query,
            "per-layer query workspace": work,
        }
        k = min((rank or 0) + OVERSAMPLE, 1 << 30)
        per_query = sum(2 * i.out_dim * i.in_dim * (i.out_dim + i.in_dim) if rank is None else 12 * i.out_dim * i.in_dim * k for i in infos.values())
        seconds = num_queries * (train_probe.seconds_per_sequence * q_len / max(seq_len, 1)) + num_queries * per_query / rate
        return Stage("precondition queries", parts, seconds)

    def score_stage(batch: int, group: int) -> Stage:
        dense_chunk = compute * min(batch * max_oi, CHUNK_ELEMENTS)
        parts = {
            "held now (model, runtime, loaded data)": held,
            "factors": factors_held,
            f"preconditioned gradients of {group} queries": group * p_per_query,
            f"activations and captures of a batch of {batch}": batch * act,
            "per-sequence gradients (one chunk at a time)": dense_chunk,
            "a layer's expanded rank-R queries": compute * group * max_oi if rank is not None else 0,
            "scores": 4 * num_queries * num_sequences,
        }
        groups = math.ceil(num_queries / max(group, 1)) if num_queries else 1
        flops = groups * tokens * 2 * oi + num_sequences * num_queries * 2 * oi
        seconds = groups * num_sequences * train_probe.seconds_per_sequence * 0.9 + flops / rate
        return Stage("score", parts, seconds)

    notes: list[str] = []
    # batch sizes: the largest up to the stage's token cap that fit the budget
    fixed_batch = execution.batch_size
    score_cap = cap(LOW_RANK_TOKENS_PER_BATCH if rank is not None else TOKENS_PER_BATCH)
    qcands = [execution.query_batch_size] if execution.query_batch_size else list(range(min(max(num_queries, 1), MAX_QUERY_BATCH), 0, -1))
    group = num_queries
    while group > 1 and "score" in stages and score_stage(1, group).peak > budget:
        group = max(1, group // 2)
    if num_queries and group < num_queries:
        notes.append(
            f"the preconditioned gradients of all {num_queries} queries do not fit: they are scored in groups of {group} "
            f"(one pass over the data per group); a query rank (e.g. 32) keeps them small"
        )
    qbatch = next((q for q in qcands if "precondition" not in stages or precondition_stage(q, max(group, 1)).peak <= budget), qcands[-1])

    def largest(limit: int, fits) -> int:
        candidates = [fixed_batch] if fixed_batch else list(range(limit, 0, -1))
        return next((b for b in candidates if fits(b)), candidates[-1])

    batch = largest(cap(TOKENS_PER_BATCH), lambda b: "fit" not in stages or fit_stage(b, 0).peak <= budget)
    score_batch = largest(score_cap, lambda b: "score" not in stages or score_stage(b, group).peak <= budget)
    cache = 0
    if two_pass and "fit" in stages:
        want = num_sequences * sizes["captures_per_sequence"]
        if execution.cache_gib is not None:
            cache = want if want <= execution.cache_gib * GiB else 0
        elif fit_stage(batch, want).peak <= budget:
            cache = want
    planned = {}
    if "fit" in stages and strategy != "identity":
        planned["fit"] = fit_stage(batch, cache)
    if "precondition" in stages and num_queries:
        planned["precondition"] = precondition_stage(qbatch, group)
    if "score" in stages:
        planned["score"] = score_stage(score_batch, group)
    result = Plan(str(device), budget, source, batch, score_batch, qbatch, cache, group, planned, sizes, notes)
    if not result.fits:
        message = (
            f"even batches of {min(batch, score_batch)} sequence(s) need more than the {budget / GiB:.2f} GiB budget; "
            "track fewer layers (FactorConfig.modules), cut A and S into blocks (FactorConfig.blocks), "
            "use a query rank, shorter sequences, or a larger memory_gib"
        )
        if execution.memory_gib is not None:
            raise ConfigError(message + "\n" + result.report())
        result.notes.append(message)
    return result


def half_autocast(model: nn.Module) -> torch.dtype | None:
    """The autocast dtype for a half-precision model on a GPU (None otherwise: run as it is)."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
        return None
    return p.dtype


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
    from .task.causal_lm import CausalLMTask

    n, longest = _lengths(train)
    nq, qlen = _lengths(queries) if queries is not None else (0, 0)
    example = query_example = None
    if task is not None and not isinstance(task, CausalLMTask):  # a custom task: probe with its own examples
        example = max(train, key=_length) if n else max(queries or [], key=_length)
        query_example = max(queries, key=_length) if nq else None  # type: ignore[arg-type]
    return plan(
        model, factor_config, execution, num_sequences=max(n, 1), seq_len=max(longest, qlen, 2), num_queries=nq,
        query_len=max(qlen, 2), score_config=score_config, task=task, factors=factors, example=example,
        query_example=query_example, stages=stages, preconditioned=preconditioned,
    )


__all__ = [
    "plan",
    "plan_for_data",
    "memory_budget",
    "headroom",
    "Plan",
    "Stage",
    "Probe",
    "probe",
    "TensorMemoryTracker",
    "process_bytes",
    "available_bytes",
    "half_autocast",
    "synthetic_example",
    "TOKENS_PER_BATCH",
    "LOW_RANK_TOKENS_PER_BATCH",
]
