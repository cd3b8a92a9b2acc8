"""The memory plan: its estimates against measured peaks, and the batch sizes it picks.

How peaks are measured: ``TensorMemoryTracker`` counts the bytes of every
tensor created while a stage runs, freed when its storage is, and keeps the
peak. That is exactly the part of the plan that depends on the model and the
data (the plan adds what the process holds when it is made, measured as its
resident size). The process's peak RSS (``ru_maxrss``) would instead be
dominated, for models this small, by the interpreter and torch's libraries
(0.3–0.5 GB, larger than every stage here), and includes pages the allocator
keeps after tensors are freed; the real-model benchmark compares the plan
with ``ru_maxrss`` where the stages are large.
"""

import pytest
import torch

import lminfluence as li
from helpers import random_queries, random_sequences, tiny_llama
from lminfluence import memory
from lminfluence.errors import ConfigError

HELD = "held now (model, runtime, loaded data)"
SIZES = [dict(hidden=64, mlp=256, layers=2, vocab=256), dict(hidden=128, mlp=512, layers=3, vocab=512)]


def stage_estimate(plan: memory.Plan, *names: str) -> int:
    """The largest planned peak of these stages, less what the process held when planning."""
    return max(plan.stages[n].peak - plan.stages[n].parts[HELD] for n in names)


def measured_peak(fn) -> tuple[int, object]:
    tracker = memory.TensorMemoryTracker()
    with tracker:
        out = fn()
    return tracker.peak, out


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"hidden{s['hidden']}")
def test_estimates_are_within_25_percent_of_measured_peaks(size):
    """For two model sizes, the planned peak of fitting EK-FAC, and of preconditioning and scoring
    queries (full rank and rank 4), is within 25% of the peak bytes of the tensors the stage creates.
    """
    model = tiny_llama(dtype=torch.float32, **size)
    train = random_sequences(12, vocab=size["vocab"], lengths=(64, 64))
    queries = random_queries(6, vocab=size["vocab"])
    ex = li.Execution(batch_size=4, query_batch_size=3, cache_gib=0)
    kw = dict(num_sequences=12, seq_len=64, num_queries=6, query_len=6)
    plan = memory.plan(model, li.FactorConfig(), ex, **kw)
    peak, factors = measured_peak(lambda: li.fit_factors(model, train, execution=ex))
    estimate = stage_estimate(plan, "fit")
    assert abs(estimate - peak) <= 0.25 * peak, ("fit", estimate, peak)
    for rank in (None, 4):
        cfg = li.ScoreConfig(query_rank=rank)
        plan = memory.plan(model, li.FactorConfig(), ex, score_config=cfg, factors=factors, **kw)
        peak, _ = measured_peak(lambda: li.compute_scores(model, factors, queries, train, cfg, execution=ex))
        estimate = stage_estimate(plan, "precondition", "score")
        assert abs(estimate - peak) <= 0.25 * peak, (rank, estimate, peak)


def test_automatic_sizes_fit_the_budget_and_explicit_ones_are_kept(monkeypatch):
    """Batch sizes left at None are the largest whose planned peaks fit the budget: one more
    sequence per batch would not fit; numbers given are kept; a budget nothing fits is refused
    with the fix named; the report names every stage. (What the process holds is fixed at 400 MiB
    here: its resident size moves by tens of MiB between plans, as much as a batch of this model.)
    """
    monkeypatch.setattr(memory, "process_bytes", lambda device: 400 * 2**20)
    model = tiny_llama(dtype=torch.float32, **SIZES[1])
    kw = dict(num_sequences=64, seq_len=128, num_queries=8, query_len=16)
    roomy = memory.plan(model, li.FactorConfig(), li.Execution(cache_gib=0), **kw)
    assert roomy.fit_batch_size == roomy.score_batch_size == memory.TOKENS_PER_BATCH["cpu"] // 128  # capped by tokens, not memory
    low = memory.plan(model, li.FactorConfig(), li.Execution(cache_gib=0), score_config=li.ScoreConfig(query_rank=4), **kw)
    assert low.score_batch_size == roomy.score_batch_size  # rank-R scoring runs batches as large as full rank's

    def fit_peak(batch: int) -> int:
        return memory.plan(model, li.FactorConfig(), li.Execution(batch_size=batch, cache_gib=0), stages=("fit",), **kw).stages["fit"].peak

    budget = (fit_peak(2) + fit_peak(3)) / 2 / 2**30  # room for two sequences per batch, not three
    tight = memory.plan(model, li.FactorConfig(), li.Execution(memory_gib=budget, cache_gib=0), stages=("fit",), **kw)
    assert tight.fit_batch_size == 2 and tight.fits
    with pytest.raises(ConfigError, match="memory_gib"):
        memory.plan(model, li.FactorConfig(), li.Execution(memory_gib=budget, batch_size=3, cache_gib=0), stages=("fit",), **kw)
    kept = memory.plan(model, li.FactorConfig(), li.Execution(memory_gib=budget, batch_size=1, query_batch_size=2), stages=("fit",), **kw)
    assert (kept.fit_batch_size, kept.query_batch_size) == (1, 2)
    with pytest.raises(ConfigError, match="memory_gib"):
        memory.plan(model, li.FactorConfig(), li.Execution(memory_gib=0.01), **kw)
    text = roomy.report()
    assert all(word in text for word in ("fit", "precondition queries", "score", "batch size"))
    assert roomy.execution(li.Execution(query_batch_size=5)).query_batch_size == 5


def test_what_only_buys_speed_takes_a_share_of_the_automatic_budget(monkeypatch):
    """With the budget left automatic, a batch's activations take at most BATCH_SHARE of it and
    EK-FAC's capture cache is kept only within CACHE_SHARE. Both only buy speed; spending the
    whole free RAM on them made a real model's fit peak at 18 GB where 4 GB did the same work.
    The budget is pinned (what the process holds, 64 MiB, plus a chosen free RAM), so the
    expected sizes are exact: 3.5 sequences' activations in the batch's share give batches of 3,
    training and query ones (the token cap alone gives 8), a budget 10 % short of four times the cache drops
    it, and a work cap of 2.5 sequences' passes gives training batches of 3.
    """
    import sys

    planning = sys.modules["lminfluence.memory.plan"]
    held = 64 * 2**20
    monkeypatch.setattr(planning, "process_bytes", lambda device: held)
    model = tiny_llama(dtype=torch.float32, **SIZES[1])
    kw = dict(num_sequences=64, seq_len=128, num_queries=8, query_len=128)  # queries as long as the sequences: query batches of 3 too

    def planned(budget: float) -> memory.Plan:
        monkeypatch.setattr(planning, "available_bytes", lambda device: (budget - held) / planning.AVAILABLE_SHARE)
        return memory.plan(model, li.FactorConfig(), li.Execution(), **kw)

    act = planned(2**34).sizes["activations_per_sequence"]
    assert planned(2**34).fit_batch_size == memory.TOKENS_PER_BATCH["cpu"] // 128 == 8
    three = planned(3.5 * act / memory.BATCH_SHARE)
    assert three.fits and three.fit_batch_size == three.score_batch_size == three.query_batch_size == 3
    cache = 64 * three.sizes["captures_per_sequence"]
    without = planned(0.9 * cache / memory.CACHE_SHARE)
    assert without.fits and without.cache_bytes == 0 and without.stages["fit"].peak + cache <= without.budget  # it would fit
    assert planned(1.1 * cache / memory.CACHE_SHARE).cache_bytes == cache
    # on a CPU a batch also stops growing once its work (6 × parameters × tokens) makes per-batch costs negligible
    params = sum(p.numel() for p in model.parameters())
    monkeypatch.setitem(planning.WORK_PER_BATCH, "cpu", 6 * params * 128 * 2.5)
    worked = planned(2**34)
    assert worked.fit_batch_size == worked.score_batch_size == 3


def test_fit_and_scores_at_automatic_sizes_equal_explicit_ones():
    """The library's defaults (sizes from the plan) give the factors and scores of explicit sizes."""
    model = tiny_llama()
    train = random_sequences(9)
    queries = random_queries(3)
    auto = li.fit_factors(model, train)
    explicit = li.fit_factors(model, train, execution=li.Execution(batch_size=2, cache_gib=0))
    for n in auto.layers:
        torch.testing.assert_close(auto.curvature.state[n]["lambda"], explicit.curvature.state[n]["lambda"], rtol=1e-9, atol=1e-12)
    a = li.compute_scores(model, auto, queries, train)
    b = li.compute_scores(model, auto, queries, train, execution=li.Execution(batch_size=2, query_batch_size=1))
    torch.testing.assert_close(a.total, b.total, rtol=1e-9, atol=1e-12)
