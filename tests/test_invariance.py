"""Invariance tier: how the work is split must not change the numbers."""

import pytest
import torch
from helpers import random_queries, random_sequences, spearman, tiny_gpt2, tiny_llama

import lminfluence as li
from lminfluence.curvature.math import low_rank
from lminfluence.scoring.contract import LayerQueries, layer_scores


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2()
    train = random_sequences(9)
    queries = random_queries(4)
    factors = li.fit_factors(model, train, li.FactorConfig(fisher="empirical"), execution=li.Execution(batch_size=4))
    return model, train, queries, factors


def test_fit_batch_size_invariance(setup):
    """Factors fitted with batch size 1 and 4 are equal (padding masked out of A, S and Λ)."""
    model, train, _, factors = setup
    other = li.fit_factors(model, train, li.FactorConfig(fisher="empirical"), execution=li.Execution(batch_size=1))
    assert other.num_tokens == factors.num_tokens == sum(len(e["input_ids"]) for e in train)
    for n in factors.layers:
        torch.testing.assert_close(other.curvature.state[n]["lambda"], factors.curvature.state[n]["lambda"])


@pytest.mark.parametrize("kwargs", [dict(batch_size=1), dict(query_batch_size=1), dict(batch_size=9, query_batch_size=3)])
def test_batching_and_query_chunking_invariance(setup, kwargs):
    """Scores do not depend on how training sequences or queries are batched (padding included)."""
    model, train, queries, factors = setup
    base = li.compute_scores(model, factors, queries, train, execution=li.Execution(batch_size=4, query_batch_size=4))
    other = li.compute_scores(model, factors, queries, train, execution=li.Execution(**kwargs))
    torch.testing.assert_close(other.total, base.total, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 3])
def test_algorithm_invariance_and_decompositions(setup, rank):
    """materialise, project and auto give the same totals; per-layer scores sum to the
    total (Eq 30) and per-token scores sum to the total (Eq 31)."""
    model, train, queries, factors = setup
    results = {
        alg: li.compute_scores(
            model, factors, queries, train, li.ScoreConfig(algorithm=alg, query_rank=rank, per_layer=True)
        )
        for alg in ("materialize", "project", "auto")
    }
    for alg, s in results.items():
        torch.testing.assert_close(s.total, results["materialize"].total, rtol=1e-9, atol=1e-12, msg=alg)
        torch.testing.assert_close(sum(s.per_layer.values()), s.total)
    tok = li.compute_scores(model, factors, queries, train, li.ScoreConfig(per_token=True, query_rank=rank))
    torch.testing.assert_close(tok.per_token.sum(-1), results["auto"].total, rtol=1e-9, atol=1e-12)
    assert tok.per_token.shape == (len(queries), len(train), max(len(e["input_ids"]) for e in train))


def test_full_rank_factorisation_is_exact():
    """A rank-min(O, I) factorisation projects to the same scores as the dense P."""
    g = torch.Generator().manual_seed(0)
    Q, B, T, O, I = 3, 2, 5, 6, 4
    p = torch.randn(Q, O, I, generator=g, dtype=torch.float64)
    a = torch.randn(B, T, I, generator=g, dtype=torch.float64)
    ds = torch.randn(B, T, O, generator=g, dtype=torch.float64)
    u, s, v = low_rank(p, min(O, I))
    full = LayerQueries(u=u, s=s, v=v)
    dense = LayerQueries(dense=p)
    want = torch.einsum("qoi,bto,bti->qbt", p, ds, a)
    for lq, alg in ((full, "project_low_rank"), (dense, "project"), (full, "materialize"), (dense, "materialize")):
        tot, tok = layer_scores(lq, a, ds, alg)
        torch.testing.assert_close(tot, want.sum(-1))
        if tok is not None:
            torch.testing.assert_close(tok, want)



@pytest.mark.parametrize("strategy", ["identity", "diagonal", "ekfac"])
@pytest.mark.parametrize("T", [2, 40])  # short queries rotate tokens, long ones gradients
def test_preconditioned_captures_equal_preconditioned_gradients(setup, strategy, T):
    """From ā and ds directly: dense = (G+λI)⁻¹ Σ_t ds_t ā_tᵀ, and the rank-R factors
    (found in the eigenbasis, then rotated) are that matrix's truncated SVD;
    rank ≥ min(O, I) keeps P dense and exact."""
    model, train, _, _ = setup
    factors = li.fit_factors(model, train, li.FactorConfig(strategy=strategy))
    name, info = next(iter(factors.layers.items()))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, T, info.in_dim, dtype=torch.float64, generator=g)
    ds = torch.randn(3, T, info.out_dim, dtype=torch.float64, generator=g)
    dense = factors.curvature.precondition(name, torch.einsum("bto,bti->boi", ds, a), 0.3)
    exact = LayerQueries.precondition(factors.curvature, name, a, ds, 0.3, rank=min(info.out_dim, info.in_dim))
    assert not exact.is_low_rank
    torch.testing.assert_close(exact.dense, dense)
    lq = LayerQueries.precondition(factors.curvature, name, a, ds, 0.3, rank=4)
    torch.testing.assert_close(lq.expanded(), _truncate(dense, 4))


def _truncate(p, rank):
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    return u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]


def test_float32_path_matches_float64():
    """The same model in float32 gives the float64 scores to float32 precision."""
    model = tiny_llama()
    train = random_sequences(6)
    queries = random_queries(2)
    f64 = li.fit_factors(model, train, li.FactorConfig(fisher="empirical"))
    s64 = li.compute_scores(model, f64, queries, train)
    model32 = tiny_llama(dtype=torch.float32)
    f32 = li.fit_factors(model32, train, li.FactorConfig(fisher="empirical"))
    s32 = li.compute_scores(model32, f32, queries, train)
    assert s32.total.dtype == torch.float32
    scale = s64.total.abs().max()
    torch.testing.assert_close(s32.total.double(), s64.total, rtol=1e-3, atol=1e-4 * float(scale))
    assert all(spearman(s32.total[q], s64.total[q]) > 0.999 for q in range(2))


def test_bfloat16_model_scores_in_float32():
    """A bf16 model (transformers' default for most checkpoints) is fitted and scored with
    statistics in float32: finite float32 scores, low rank included, that rank the training
    set like the float32 model (bf16 weights differ, so only the ranking is compared)."""
    model = tiny_llama(dtype=torch.float32)
    train = random_sequences(8)
    queries = random_queries(2)
    s32 = li.compute_scores(model, li.fit_factors(model, train), queries, train)
    half = tiny_llama(dtype=torch.bfloat16)
    factors = li.fit_factors(half, train)
    for cfg in (li.ScoreConfig(), li.ScoreConfig(query_rank=2, per_token=True)):
        s = li.compute_scores(half, factors, queries, train, cfg)
        assert s.total.dtype == torch.float32 and torch.isfinite(s.total).all()
    full = li.compute_scores(half, factors, queries, train)
    assert all(spearman(full.total[q], s32.total[q]) > 0.9 for q in range(2))


def test_save_load_round_trip(setup, tmp_path):
    """Saved and reloaded factors give identical scores; the manifest records the fit."""
    model, train, queries, factors = setup
    factors.save(tmp_path / "f")
    loaded = li.load_factors(tmp_path / "f", model=model)
    assert loaded.layers == factors.layers and loaded.config == factors.config
    assert loaded.num_tokens == factors.num_tokens and loaded.num_sequences == len(train)
    a = li.compute_scores(model, factors, queries, train)
    b = li.compute_scores(model, loaded, queries, train)
    assert torch.equal(a.total, b.total)


def test_fit_writes_output_dir_and_iterators_work(tmp_path):
    """output_dir saves the factors; one-shot iterators are accepted for train and queries."""
    model = tiny_gpt2()
    train = random_sequences(5)
    factors = li.fit_factors(model, iter(train), output_dir=tmp_path / "run")
    assert (tmp_path / "run" / "manifest.json").is_file()
    s1 = li.compute_scores(model, factors, (q for q in random_queries(2)), (t for t in train))
    s2 = li.compute_scores(model, factors, random_queries(2), train)
    torch.testing.assert_close(s1.total, s2.total)


def test_datasets_dataset_input(setup):
    """A datasets.Dataset (rows as lists, or torch-formatted) gives the same scores as a list of dicts."""
    import datasets  # a dev dependency: its absence is a failure, not a skip
    model, train, queries, factors = setup
    rows = {"input_ids": [e["input_ids"].tolist() for e in train]}
    plain = datasets.Dataset.from_dict(rows)
    formatted = datasets.Dataset.from_dict(rows).with_format("torch")
    q = datasets.Dataset.from_dict({k: [e[k].tolist() for e in queries] for k in ("input_ids", "labels")})
    want = li.compute_scores(model, factors, queries, train).total
    for data in (plain, formatted):
        torch.testing.assert_close(li.compute_scores(model, factors, q, data).total, want)
    refit = li.fit_factors(model, plain, li.FactorConfig(fisher="empirical"), execution=li.Execution(batch_size=4))
    for n in factors.layers:
        torch.testing.assert_close(refit.curvature.state[n]["lambda"], factors.curvature.state[n]["lambda"])


def test_capture_cache_changes_nothing_but_speed():
    """EK-FAC's second pass replayed from the cached first pass gives bit-identical
    factors to recomputing it (every pass draws the same labels), and a budget too
    small for the whole pass falls back to recomputing."""
    model = tiny_llama()
    train = random_sequences(10)
    cached = li.fit_factors(model, train, execution=li.Execution(batch_size=3))
    recomputed = li.fit_factors(model, train, execution=li.Execution(batch_size=3, cache_gib=0))
    tiny_budget = li.fit_factors(model, train, execution=li.Execution(batch_size=3, cache_gib=1e-6))
    assert cached.meta["second_pass_replayed"]
    assert not recomputed.meta["second_pass_replayed"] and not tiny_budget.meta["second_pass_replayed"]
    for n in cached.layers:
        for other in (recomputed, tiny_budget):
            assert torch.equal(cached.curvature.state[n]["lambda"], other.curvature.state[n]["lambda"])
    with pytest.raises(ValueError, match="cache_gib"):
        li.fit_factors(model, train, execution=li.Execution(cache_gib=-1))
