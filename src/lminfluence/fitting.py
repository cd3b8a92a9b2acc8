"""Fitting curvature factors over a training set."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dist
from .config import Execution, FactorConfig
from .curvature import placement
from .curvature.checkpoint import FitCheckpoint, InStepCheckpoint, Progress, agree, checkpoint_dir, examples_digest, fit_key, test_kill
from .curvature.factors import Factors
from .curvature.strategies import make_curvature
from .errors import InputError
from .fingerprint import model_fingerprint
from .hooks.modules import layer_info, resolve_modules
from .passes import BatchCapture, LossKind, as_reiterable, half_autocast, model_device, num_examples, run_pass, tracking
from .task.base import Task

logger = logging.getLogger(__name__)


class CaptureCache:
    """The first pass's captures, kept while they fit in a memory budget.

    Sizes are counted per distinct storage (layers that share ā count it once).
    As soon as the budget would be exceeded, or is projected to be from the
    first batch and the dataset's length, everything is dropped and the cache
    stays off.
    """

    def __init__(self, budget_gib: float, total_examples: int | None) -> None:
        self.budget = budget_gib * 2**30
        self.total = total_examples
        self.items: list[BatchCapture] | None = [] if self.budget > 0 else None
        self.bytes = 0
        self.seen = 0
        self.complete = False

    def offer(self, bc: BatchCapture) -> None:
        if self.items is None:
            return
        storages = {}
        for cap in (c for draw in bc.draws for c in draw.values()):
            for t in (cap.a, cap.ds):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.bytes += sum(storages.values())
        self.seen += bc.num_sequences
        projected = self.bytes / self.seen * self.total if self.total else self.bytes
        if projected > self.budget:
            logger.info("captures need ~%.2f GiB > the cache's %.2f GiB: the second pass recomputes", projected / 2**30, self.budget / 2**30)
            self.items = None
            return
        self.items.append(bc)

    def close(self) -> None:
        self.complete = self.items is not None

    def replay(self) -> Iterable[BatchCapture]:
        items, self.items = deque(self.items or []), None  # each batch is freed once replayed
        while items:
            yield items.popleft()


def _shard(train: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of the training sequences; each keeps its global index (its labels' seed)."""
    if not dist.active():
        return 0, -1
    n = num_examples(train)
    n = _count(train) if n is None else n
    if n < dist.world_size():
        raise InputError(f"train: {n} sequences for {dist.world_size()} processes; every process needs at least one (use fewer processes)")
    return dist.span(n)


def _checkpointer(model, train, config, task, layers, output_dir, execution, shard, owned: bool) -> FitCheckpoint:
    """The fit's checkpoints under ``output_dir`` (with layer-owned factors: saved and restored by all ranks in step)."""
    key = fit_key(
        {
            "model": model_fingerprint(model),
            "config": config.to_dict(),
            "task": [type(task).__module__, type(task).__qualname__, sorted((k, repr(v)) for k, v in vars(task).items())],
            "data": examples_digest(train),
            "layers": {n: info.to_dict() for n, info in layers.items()},
            **({"shard": [*shard, dist.world_size()]} if dist.active() else {}),
            **({"factor_placement": "by_layer"} if owned else {}),
        }
    )
    kind = InStepCheckpoint if owned else FitCheckpoint
    return kind(checkpoint_dir(Path(output_dir)), key, execution.checkpoint_seconds)


def _reduce(curvature, num_tokens: int, num_sequences: int) -> tuple[int, int]:
    """The pass's sums and counts summed over ranks (float64; in place), after checking that every rank holds the same sums.

    Layer-owned sums are complete on their owners already (they received every rank's captures): only the counts are summed.
    """
    if not dist.active():
        return num_tokens, num_sequences
    sums = [] if curvature.owners is not None else curvature.running_sums()
    shapes = dist.all_gather_objects([tuple(t.shape) for t in sums])
    if any(s != shapes[0] for s in shapes):
        raise dist.DistributedError("the ranks accumulated different sums (the model calls its tracked layers differently on different ranks)")
    counts = torch.tensor([num_tokens, num_sequences], dtype=torch.float64)
    dist.all_reduce_sum_([counts, *sums])
    return int(counts[0]), int(counts[1])


def fit_factors(
    model: nn.Module,
    train: Iterable[Mapping[str, Any]],
    config: FactorConfig = FactorConfig(),
    *,
    task: Task | None = None,
    execution: Execution = Execution(),
    output_dir: str | Path | None = None,
) -> Factors:
    """Fit the curvature approximation of ``config.strategy`` on ``train``.

    Runs the passes the strategy needs (K-FAC one, EK-FAC two) with
    pseudo-labels sampled from the model (each sequence's from its own seed,
    so the factors do not depend on the batch size; ``config.label_draws``
    independent sets of them per sequence, S and Λ averaged over the draws)
    or the true labels for the empirical Fisher. Products run in the captures' dtype (float32 or
    wider), sums are accumulated in float64, eigendecompositions are float64,
    and the factors are stored in ``config.factor_dtype``.

    Args:
        model: a causal LM (or any model the task knows); left unchanged.
        train: example dicts (see CausalLMTask); a list or ``datasets.Dataset``.
        config: strategy, Fisher type, tracked modules, seed, storage dtype, blocks.
        task: defaults to CausalLMTask().
        execution: batch size (None: from the memory budget, ``lminfluence.memory``),
            the capture cache (EK-FAC's second pass replays the first pass's
            captures when they fit; the factors are identical either way),
            checkpoint interval, offloading, and the factors' placement over
            ranks (``factor_placement``, below).
        output_dir: when given, the factors are saved there, and the fit
            checkpoints its progress there (``Execution.checkpoint_seconds``):
            run again after a crash, it resumes and ends with the same factors.

    Under ``torch.distributed`` (a process group of K > 1 processes, e.g. from
    ``torchrun``) call it on every rank with the same arguments: each fits a
    contiguous K-th of ``train`` (its sequences keep their labels' seeds), the
    float64 sums are added over ranks, each eigendecomposition is computed by
    one rank and broadcast, and every rank returns the same factors (rank 0
    alone saves them; each rank checkpoints its own shard under ``output_dir``).

    With ``execution.factor_placement="by_layer"`` (``lminfluence.curvature.placement``) each
    tracked layer's sums, eigendecompositions and Λ live on one owner rank, which
    receives every rank's captures of that layer batch by batch: each rank returns
    factors holding its own layers only (``Factors.curvature.owners`` says whose
    each layer is), and rank 0 receives them layer by layer to save them in the
    usual files, which load in one process as a replicated fit's would. Every rank
    must run the same number of batches. Such a fit checkpoints in step: every rank
    saves its own layers' state at the same batches, and a rerun resumes every rank
    from the latest checkpoint they all hold.
    """
    from .task.causal_lm import CausalLMTask

    if not isinstance(config, FactorConfig):
        raise TypeError(f"config must be a FactorConfig, got {type(config).__name__}")
    if not isinstance(execution, Execution):
        raise TypeError(f"execution must be an Execution, got {type(execution).__name__}")
    task = task or CausalLMTask()
    train = as_reiterable(train, "train")
    modules = resolve_modules(model, config.modules)
    layers = {n: layer_info(m) for n, m in modules.items()}
    curvature = make_curvature(config.strategy, layers, config)
    curvature.offload = execution.offload_factors
    if not curvature.passes:  # identity: nothing to fit, but count the data for the manifest
        return _finish(model, config, curvature, 0, _count(train), {}, {}, output_dir if dist.is_main() else None)

    owned = execution.factor_placement == "by_layer" and dist.active()
    if owned and config.strategy == "lissa":
        raise placement.refuse("the lissa strategy (its products couple the layers)")
    lo, hi = _shard(train)  # under torch.distributed: this rank's sequences; one process: all (hi = -1)
    local = dist.Slice(train, lo, hi) if dist.active() else train
    head = dist.Slice(train, 0, hi) if dist.active() else train  # run_pass starts at a global index: the labels' seeds
    checkpoint = _checkpointer(model, train, config, task, layers, output_dir, execution, (lo, hi), owned) if output_dir is not None else None
    progress = checkpoint.restore(curvature) if checkpoint is not None else None
    if not owned:  # by_layer: the ranks restored the same checkpoint (InStepCheckpoint), owners included
        progress = agree(curvature, progress)
    resumed = progress is not None
    if progress is None:
        progress = Progress()
    batch_size, cache_gib = _batch_and_cache(model, config, execution, local, task, progress.batch_size)
    progress.batch_size = batch_size
    if dist.sharded_model(model) or owned:  # FSDP: each forward is a collective, every rank must run as many (by_layer: each batch is)
        dist.require_same_batches(model, len(local) - progress.start, batch_size, "fit", always=owned)  # type: ignore[arg-type]
    logger.info("fitting %s on %d tracked layers, %d sequences per batch", config.strategy, len(layers), batch_size)

    kind: LossKind = "sampled" if config.fisher == "sampled" else "true"
    autocast = half_autocast(model)
    total = num_examples(local)
    # a pass resumed midway cannot fill the cache: the second pass then recomputes (same result)
    # (and under FSDP every rank must run the second pass's forwards: no replay)
    use_cache = len(curvature.passes) > 1 and not resumed and not dist.sharded_model(model)
    cache = CaptureCache(cache_gib or 0.0, total) if use_cache else None
    batches_done = 0
    counts = (0, 0)
    with tracking(model, modules) as collector:
        for index, pass_name in enumerate(curvature.passes):
            if index < progress.pass_index:
                continue
            start = time.perf_counter() - progress.seconds.get(pass_name, 0.0)
            if index > 0 and cache is not None and cache.complete:
                batches: Iterable[BatchCapture] = cache.replay()
            else:
                batches = run_pass(
                    model, task, collector, head, batch_size, kind, seed=config.seed, start=lo + progress.start,
                    autocast=autocast, desc=f"fit {pass_name}", label_draws=config.label_draws,
                )
            if owned:  # the batches' exchanges are collectives: an error on one rank cannot wait for the pass's end
                batches_done = _accumulate(curvature, pass_name, batches, progress, cache if index == 0 else None, checkpoint, start, batches_done, owned=True)
            else:
                with dist.checked():  # an error on one rank (bad data, non-finite loss) stops every rank at the pass's end
                    batches_done = _accumulate(curvature, pass_name, batches, progress, cache if index == 0 else None, checkpoint, start, batches_done)
            if index == 0 and cache is not None:
                cache.close()
            counts = _reduce(curvature, progress.num_tokens, progress.num_sequences)
            curvature.finalize(pass_name, *counts)
            progress.seconds[pass_name] = time.perf_counter() - start
            progress = Progress(index + 1, 0, 0, 0, batch_size, progress.seconds)
            if checkpoint is not None and index + 1 < len(curvature.passes):
                checkpoint.save(curvature, progress)
    placement.share_means(curvature)
    meta = {
        "second_pass_replayed": bool(cache is not None and cache.complete),
        "batch_size": batch_size,
        "resumed": resumed,
        "processes": dist.world_size(),
        **({"factor_placement": "by_layer"} if owned else {}),
    }
    factors = _finish(model, config, curvature, counts[0], counts[1], progress.seconds, meta, output_dir)
    dist.barrier()  # the factors are saved (by rank 0) before any rank drops its checkpoint (on every rank: with or without one)
    if checkpoint is not None:
        checkpoint.clear()
    return factors


def _batch_and_cache(model: nn.Module, config: FactorConfig, execution: Execution, local: Any, task: Task, resumed_batch: int) -> tuple[int, float | None]:
    """The fit's batch size (given, resumed with, or from the memory plan) and the capture cache's GiB."""
    from .memory import CACHE_SHARE, headroom, memory_budget, plan_for_data

    batch_size = execution.batch_size or resumed_batch
    cache_gib = execution.cache_gib
    if not batch_size:
        sizes = plan_for_data(model, config, execution, local, task=task, stages=("fit",))
        batch_size = sizes.fit_batch_size
        cache_gib = cache_gib if cache_gib is not None else sizes.cache_bytes / 2**30
        logger.info("fit plan:\n%s", sizes.report())
    elif cache_gib is None:  # sizes given: the cache may use half of what the budget leaves, and a share of the budget at most
        device = model_device(model)
        cache_gib = min(headroom(device, execution) / 2, CACHE_SHARE * memory_budget(device, execution)[0]) / 2**30
    return batch_size, cache_gib


def _accumulate(
    curvature: Any, pass_name: str, batches: Iterable[BatchCapture], progress: Progress, cache: CaptureCache | None,
    checkpoint: FitCheckpoint | None, start: float, batches_done: int, owned: bool = False,
) -> int:
    """Add one pass's batches to the running sums (every label draw), filling the cache and checkpointing; batches done so far.

    ``owned``: each layer's captures of every rank go to its owner (chosen at the fit's first batch), which alone accumulates them.
    """
    gather = placement.Gather(curvature.owners) if owned and curvature.owners is not None else None
    for bc in batches:
        draws = bc.draws
        if owned:
            if gather is None:
                curvature.own(placement.assign_owners(draws[0]), dist.rank())
                gather = placement.Gather(curvature.owners)
            draws = gather(draws)
        for draw, captures in enumerate(draws):  # K label draws of one forward pass (FactorConfig.label_draws)
            if captures:  # by_layer: a rank may own no layer
                curvature.accumulate(pass_name, captures, draw)
        progress.num_tokens += bc.num_tokens
        progress.num_sequences += bc.num_sequences
        progress.start += bc.num_sequences
        if cache is not None:
            cache.offer(bc)
        del bc
        batches_done += 1
        test_kill("batch", batches_done)
        if checkpoint is not None and checkpoint.due():
            progress.seconds[pass_name] = time.perf_counter() - start
            checkpoint.save(curvature, progress)
    return batches_done


def _count(train: Iterable) -> int:
    n = sum(1 for _ in train)
    if n == 0:
        raise InputError("train: no examples (the dataset is empty)")
    return n


def _finish(model, config, curvature, num_tokens, num_sequences, timings, meta, output_dir) -> Factors:
    """The factors (rank 0 saves them to ``output_dir``, receiving layer-owned ones from their owners first)."""
    factors = Factors(
        config=config,
        curvature=curvature,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        fingerprint=model_fingerprint(model),
        meta={"seconds": timings, "torch": torch.__version__, **meta},
    )
    if output_dir is not None and (dist.is_main() or placement.by_layer(curvature)):  # by_layer: every rank sends rank 0 its layers
        factors.save(output_dir)
    return factors


__all__ = ["fit_factors", "CaptureCache"]
