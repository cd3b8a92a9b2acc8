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

from ..config import Execution, FactorConfig
from ..errors import InputError
from ..fingerprint import model_fingerprint
from ..hooks.modules import layer_info, resolve_modules
from ..passes import (
    BatchCapture,
    as_reiterable,
    model_device,
    num_examples,
    run_pass,
    tracking,
)
from ..task.base import Task
from .factors import Factors
from .strategies import make_curvature

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
        for cap in bc.captures.values():
            for t in (cap.a, cap.ds):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.bytes += sum(storages.values())
        self.seen += bc.num_sequences
        projected = self.bytes / self.seen * self.total if self.total else self.bytes
        if projected > self.budget:
            logger.info("captures need ~%.2f GiB > cache_gib: the second pass recomputes", projected / 2**30)
            self.items = None
            return
        self.items.append(bc)

    def close(self) -> None:
        self.complete = self.items is not None

    def replay(self) -> Iterable[BatchCapture]:
        items, self.items = deque(self.items or []), None  # each batch is freed once replayed
        while items:
            yield items.popleft()


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
    pseudo-labels sampled from the model (or the true labels for the empirical
    Fisher). Products run in the captures' dtype (float32 or wider), sums are
    accumulated in float64, and eigendecompositions are float64.

    Args:
        model: a causal LM (or any model the task knows); left unchanged.
        train: example dicts (see CausalLMTask); a list or ``datasets.Dataset``.
        config: strategy, Fisher type, tracked modules, seed.
        task: defaults to CausalLMTask().
        execution: batch size and the capture cache (``Execution.cache_gib``: EK-FAC's
            second pass replays the first pass's captures when they fit; the factors
            are identical either way).
        output_dir: when given, the factors are also saved there.
    """
    from ..task.causal_lm import CausalLMTask

    if not isinstance(config, FactorConfig):
        raise TypeError(f"config must be a FactorConfig, got {type(config).__name__}")
    if not isinstance(execution, Execution):
        raise TypeError(f"execution must be an Execution, got {type(execution).__name__}")
    task = task or CausalLMTask()
    train = as_reiterable(train, "train")
    modules = resolve_modules(model, config.modules)
    layers = {n: layer_info(m) for n, m in modules.items()}
    curvature = make_curvature(config.strategy, layers, config)
    logger.info("fitting %s on %d tracked layers", config.strategy, len(layers))

    device = model_device(model)
    num_tokens = num_sequences = 0
    timings: dict[str, float] = {}
    kind = "sampled" if config.fisher == "sampled" else "true"
    cache = CaptureCache(execution.cache_gib, num_examples(train)) if len(curvature.passes) > 1 else None
    with tracking(model, modules) as collector:
        for index, pass_name in enumerate(curvature.passes):
            start = time.perf_counter()
            num_tokens = num_sequences = 0
            if index > 0 and cache is not None and cache.complete:
                batches: Iterable[BatchCapture] = cache.replay()
            else:
                # The same seed in every pass: each pass draws the same labels, so a pass
                # replayed from the cache and a recomputed one give identical statistics.
                generator = torch.Generator(device=device).manual_seed(config.seed)
                batches = run_pass(model, task, collector, train, execution.batch_size, kind, generator=generator, desc=f"fit {pass_name}")
            for bc in batches:
                curvature.accumulate(pass_name, bc.captures)
                num_tokens += bc.num_tokens
                num_sequences += bc.num_sequences
                if index == 0 and cache is not None:
                    cache.offer(bc)
            if index == 0 and cache is not None:
                cache.close()
            curvature.finalize(pass_name, num_tokens, num_sequences)
            timings[pass_name] = time.perf_counter() - start
    if not curvature.passes:  # identity: nothing to fit, but count the data for the manifest
        num_sequences = sum(1 for _ in train)
        if num_sequences == 0:
            raise InputError("train: no examples (the dataset is empty)")
    factors = Factors(
        config=config,
        curvature=curvature,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        fingerprint=model_fingerprint(model),
        meta={
            "seconds": timings,
            "torch": torch.__version__,
            "second_pass_replayed": bool(cache is not None and cache.complete),
        },
    )
    if output_dir is not None:
        factors.save(output_dir)
    return factors


__all__ = ["fit_factors", "CaptureCache"]
