"""The distributed helpers on 2 CPU processes (gloo): sums, broadcasts, sharding, and errors that stop every rank."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_ranks


def _collectives():
    import torch

    from lminfluence import distributed as d

    t = torch.full((3,), float(d.rank() + 1), dtype=torch.float32)
    d.all_reduce_sum_([t])
    b = torch.full((2,), float(d.rank()))
    d.broadcast_([b], src=1)
    return {"rank": d.rank(), "world": d.world_size(), "sum": t.tolist(), "bcast": b.tolist(), "shard": d.shard(list(range(5))), "gathered": d.all_gather_objects(d.rank() * 10)}


def _one_rank_fails():
    from lminfluence import distributed as d

    with d.checked():
        if d.rank() == 1:
            raise ValueError("bad shard")
    return "unreachable"


def test_collectives_on_two_processes():
    """Sums are over ranks (1 + 2 = 3), a broadcast copies the source's values, shards are disjoint and cover everything."""
    results = run_ranks(_collectives)
    assert [s for s, _ in results] == ["ok", "ok"], results
    a, b = (r for _, r in results)
    assert a["world"] == b["world"] == 2 and (a["rank"], b["rank"]) == (0, 1)
    assert a["sum"] == b["sum"] == [3.0, 3.0, 3.0]
    assert a["bcast"] == b["bcast"] == [1.0, 1.0]
    assert sorted(a["shard"] + b["shard"]) == [0, 1, 2, 3, 4] and not set(a["shard"]) & set(b["shard"])
    assert a["gathered"] == b["gathered"] == [0, 10]


def test_an_error_on_one_rank_stops_every_rank():
    """Rank 1 fails inside a checked block: it raises its own error, and rank 0 raises DistributedError naming rank 1 (no hang)."""
    (s0, m0), (s1, m1) = run_ranks(_one_rank_fails)
    assert (s0, s1) == ("error", "error")
    assert m1 == "ValueError: bad shard"
    assert m0.startswith("DistributedError: rank 1 failed: ValueError: bad shard")


def test_single_process_is_rank_zero_of_one():
    from lminfluence import distributed as d

    assert (d.rank(), d.world_size(), d.is_main(), d.shard([1, 2, 3])) == (0, 1, True, [1, 2, 3])


def _two_stage(world_tag: str):
    """The two-stage procedure on a tiny float64 GPT-2 (the same model, data and factors on every rank)."""
    import numpy as np

    import lminfluence as li
    from helpers import random_queries, random_sequences, tiny_gpt2
    from lminfluence.scoring.two_stage import TwoStageConfig, two_stage_scores

    model, train, queries = tiny_gpt2(layers=2), random_sequences(23), random_queries(5)
    factors = li.fit_factors(model, train)
    result = two_stage_scores(
        model, factors, queries, train, li.ScoreConfig(query_rank=2), TwoStageConfig(candidates=15, rescore_top=4, top=3),
        execution=li.Execution(batch_size=4, query_batch_size=2), chunk_size=5,
    )  # fmt: skip
    return {
        "columns": result.columns, "first": result.first, "final": result.final,
        "shown": [(s.indices, s.total, np.stack(list(s.per_layer.values())), s.per_token) for s in result.shown],
    }  # fmt: skip


def test_two_stage_scores_do_not_depend_on_the_number_of_processes():
    """Two ranks splitting the scan's chunks, the re-score's and the details' query groups (each rank
    preconditioning its share of the queries once and broadcasting it) give the one-process result:
    candidates, scan, re-score and shown details, to 1e-10 relative on a float64 model."""
    import numpy as np

    one = _two_stage("1")
    results = run_ranks(_two_stage, "2")
    assert [s for s, _ in results] == ["ok", "ok"], results
    for _, got in results:
        np.testing.assert_array_equal(got["columns"], one["columns"])
        for key in ("first", "final"):
            np.testing.assert_allclose(got[key], one[key], rtol=1e-10, atol=1e-12 * np.nanmax(np.abs(one[key])), equal_nan=True)
        for (i1, t1, l1, k1), (i2, t2, l2, k2) in zip(one["shown"], got["shown"]):
            np.testing.assert_array_equal(i1, i2)
            for a, b in ((t1, t2), (l1, l2), (k1, k2)):
                np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * np.abs(t1).max())


# ------------------------------------------------------------------ fitting


def _fit_all(strategies, device="cpu"):
    return {s: _fit(s, device) for s in strategies}


def _fit(strategy: str, device: str = "cpu"):
    """Factors of a tiny float64 Llama (gated MLP: a shared A) fitted on 23 sequences, batch 4; every tensor, counts, and P = (G+λI)⁻¹V of fixed V."""
    import torch

    import lminfluence as li
    from helpers import random_sequences, tiny_llama

    model, train = tiny_llama(layers=2).to(device), random_sequences(23)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy=strategy), execution=li.Execution(batch_size=4))
    g = torch.Generator().manual_seed(0)
    applied = {}
    for name, info in factors.layers.items():
        v = torch.randn(3, info.out_features, info.in_features + int(info.bias), generator=g, dtype=torch.float64).to(device)
        applied[name] = factors.curvature.precondition(name, v, 0.1 * factors.curvature.mean_eigenvalue(name)).cpu()
    state = {k: v.cpu() for k, v in factors.curvature.state_dict().items()}
    return {"state": state, "counts": (factors.num_tokens, factors.num_sequences), "applied": applied}


def _same_factors(one, got, rtol=1e-10):
    """Eigenvalues and Λ within ``rtol``; eigenvectors up to each column's sign (eigh's choice); the preconditioner applied to V within ``rtol``."""
    import torch

    assert got["counts"] == one["counts"]
    assert set(got["state"]) == set(one["state"])
    for key, a in one["state"].items():
        b = got["state"][key]
        if "::q_" in key:  # a column's sign is eigh's free choice: align it
            b = b * torch.sign((a * b).sum(0))
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * a.abs().max(), msg=key)
    for name, a in one["applied"].items():
        torch.testing.assert_close(got["applied"][name], a, rtol=rtol, atol=rtol * a.abs().max(), msg=name)


def test_fit_does_not_depend_on_the_number_of_processes():
    """Two ranks fitting halves of the data (their sums added in float64, eigendecompositions spread over ranks
    and broadcast) give the one-process factors on a float64 model: only the order of float64 additions differs
    (~1e-16 relative), so 1e-10 relative is loose yet far below any real difference; both ranks return the same factors."""
    strategies = ("ekfac", "kfac", "diagonal")
    results = run_ranks(_fit_all, strategies)
    assert [s for s, _ in results] == ["ok", "ok"], results
    for strategy in strategies:
        one = _fit(strategy)
        for _, got in results:
            _same_factors(one, got[strategy])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_does_not_depend_on_the_number_of_processes():
    """The same invariant with the model and the sums on the GPU (two ranks sharing it over gloo: the sums and
    bases travel through CPU buffers), against one process on the GPU; 1e-10 relative as on the CPU."""
    strategies = ("ekfac", "diagonal")
    results = run_ranks(_fit_all, strategies, "cuda")
    assert [s for s, _ in results] == ["ok", "ok"], results
    for strategy in strategies:
        one = _fit(strategy, "cuda")
        for _, got in results:
            _same_factors(one, got[strategy])


# ------------------------------------------------------------------ scoring


def _scores(dtype_name: str):
    """Fit EK-FAC and score on a tiny GPT-2 (40 sequences, 6 queries, batch 4): full rank with per-layer and
    per-token scores, rank 2, self-influence with per-layer scores, and 3 steps of CG refinement."""
    import torch

    import lminfluence as li
    from helpers import random_queries, random_sequences, tiny_gpt2

    model, train, queries = tiny_gpt2(layers=2, dtype=getattr(torch, dtype_name)), random_sequences(40), random_queries(6)
    ex = li.Execution(batch_size=4, query_batch_size=2)
    factors = li.fit_factors(model, train, execution=ex)
    full = li.compute_scores(model, factors, queries, train, li.ScoreConfig(per_layer=True, per_token=True), execution=ex)
    low = li.compute_scores(model, factors, queries, train, li.ScoreConfig(query_rank=2), execution=ex)
    own = li.compute_self_scores(model, factors, train, li.ScoreConfig(per_layer=True), execution=ex)
    cg = li.compute_scores(model, factors, queries, train, li.ScoreConfig(refine="cg", refine_steps=3), execution=ex)
    out = {"full": full.total, "low": low.total, "self": own.total, "tokens": full.per_token, "cg": cg.total}
    out.update({f"layer {n}": t for n, t in full.per_layer.items()})
    out.update({f"self layer {n}": t for n, t in own.per_layer.items()})
    return {k: v.double().numpy() for k, v in out.items()}


def test_scores_do_not_depend_on_the_number_of_processes():
    """Queries preconditioned by shares on each rank and broadcast, the training set scored in two contiguous
    halves and gathered: every rank returns the one-process scores (total, rank 2, per layer, per token,
    self-influence, CG-refined queries whose products run over the whole training set) on a float64 model to
    1e-10 relative (only float64 rounding of the factors' sums differs)."""
    import numpy as np

    one = _scores("float64")
    results = run_ranks(_scores, "float64")
    assert [s for s, _ in results] == ["ok", "ok"], results
    for _, got in results:
        assert set(got) == set(one)
        for key, a in one.items():
            assert got[key].shape == a.shape, key
            np.testing.assert_allclose(got[key], a, rtol=1e-10, atol=1e-10 * np.abs(a).max(), err_msg=key)


def test_float32_scores_match_one_process_closely():
    """On a float32 model the batches of two ranks are padded differently from one process's, so sums round
    differently (~1e-7 relative): per query, scores correlate with the one-process ones at Pearson ≥ 0.99999
    and the top 10 training sequences are the same, in the same order."""
    import numpy as np

    one = _scores("float32")
    results = run_ranks(_scores, "float32")
    assert [s for s, _ in results] == ["ok", "ok"], results
    for _, got in results:
        for key in ("full", "low"):
            for q, (a, b) in enumerate(zip(one[key], got[key])):
                assert np.corrcoef(a, b)[0, 1] >= 0.99999, (key, q)
                np.testing.assert_array_equal(np.argsort(-b, kind="stable")[:10], np.argsort(-a, kind="stable")[:10], err_msg=f"{key} query {q}")
        assert np.corrcoef(one["self"], got["self"])[0, 1] >= 0.99999


def _fit_with_a_bad_sequence():
    """A token id beyond the vocabulary in the last sequence: only the last rank's shard holds it."""
    import torch

    import lminfluence as li
    from helpers import random_sequences, tiny_gpt2

    train = random_sequences(12)
    train[-1] = {"input_ids": torch.tensor([1, 2, 999])}
    li.fit_factors(tiny_gpt2(layers=1), train, execution=li.Execution(batch_size=2))
    return "unreachable"


def test_an_error_in_one_ranks_fit_stops_every_rank():
    """The failing rank raises its own error; the other finishes its pass, learns of it at the pass's
    synchronisation and raises DistributedError naming the rank and the error, instead of waiting forever."""
    (s0, m0), (s1, m1) = run_ranks(_fit_with_a_bad_sequence)
    assert (s0, s1) == ("error", "error")
    assert m1.startswith("InputError: token id 999 is outside the model's vocabulary"), m1
    assert m0.startswith(f"DistributedError: rank 1 failed: {m1}"), m0


# ------------------------------------------------------------ an FSDP-sharded model


def _fsdp(shard: bool, batch_size: int = 4):
    """EK-FAC factors and scores (full rank with per-layer and per-token, rank 2, self-influence) of a tiny
    float64 GPT-2 on 24 sequences, its blocks and itself sharded with ``fully_shard`` when ``shard``."""
    import lminfluence as li
    from helpers import random_queries, random_sequences, tiny_gpt2

    model, train, queries = tiny_gpt2(layers=2), random_sequences(24), random_queries(5)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    ex = li.Execution(batch_size=batch_size, query_batch_size=2)
    factors = li.fit_factors(model, train, execution=ex)
    full = li.compute_scores(model, factors, queries, train, li.ScoreConfig(per_layer=True, per_token=True), execution=ex)
    low = li.compute_scores(model, factors, queries, train, li.ScoreConfig(query_rank=2), execution=ex)
    own = li.compute_self_scores(model, factors, train, execution=ex)
    lam = {k: v for k, v in factors.curvature.state_dict().items() if k.endswith("::lambda") or "::e_" in k}
    out = {"full": full.total, "low": low.total, "self": own.total, "tokens": full.per_token, **lam}
    out.update({f"layer {n}": t for n, t in full.per_layer.items()})
    return {k: v.double().numpy() for k, v in out.items()}


def test_an_fsdp_sharded_model_gives_the_factors_and_scores_of_one_process():
    """With the weights sharded over 2 ranks by FSDP (``fully_shard``; the hooks read layer inputs and output
    gradients, which FSDP leaves whole) and the data split as for a plain model, eigenvalues, Λ and every
    score equal the one-process, unsharded ones to 1e-10 relative (float64 model)."""
    import numpy as np

    one = _fsdp(False)
    results = run_ranks(_fsdp, True)
    assert [s for s, _ in results] == ["ok", "ok"], results
    for _, got in results:
        assert set(got) == set(one)
        for key, a in one.items():
            np.testing.assert_allclose(got[key], a, rtol=1e-10, atol=1e-10 * np.abs(a).max(), err_msg=key)


def _fsdp_out_of_step():
    """23 sequences split 11 + 12, in batches of 11: 1 batch on rank 0, 2 on rank 1."""
    from torch.distributed.fsdp import fully_shard

    import lminfluence as li
    from helpers import random_sequences, tiny_gpt2

    model = tiny_gpt2(layers=1)
    fully_shard(model)
    li.fit_factors(model, random_sequences(23), execution=li.Execution(batch_size=11))
    return "unreachable"


def test_fsdp_refuses_batches_that_would_leave_ranks_out_of_step():
    """Each forward of an FSDP model is a collective: ranks with different numbers of batches would wait for
    each other forever. Both ranks refuse before the first batch, with an error that names a batch size that works."""
    results = run_ranks(_fsdp_out_of_step)
    for status, message in results:
        assert status == "error" and message.startswith("DistributedError: fit: with an FSDP-sharded model"), message
        assert "[1, 2]" in message and "e.g. " in message
