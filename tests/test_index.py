"""The gradient index: exact against compute_scores, each compression against its brute-force definition.

Brute force here: per-sequence gradients DW from one loss.backward() per sequence (helpers.loop_gradients),
the EK-FAC eigenbasis and Λ read from the fitted factors, and every selection, SVD and projection done
densely with numpy/torch.linalg, independently of the library's contractions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import allclose_report, lm_loss_fn, lm_summed_nll, loop_gradients, random_queries, random_sequences, tiny_gpt2, tiny_llama

import lminfluence as li
from lminfluence.errors import ConfigError, CorruptFileError
from lminfluence.hooks import resolve_modules
from lminfluence.index import IndexConfig, build_index, score_with_index, two_stage_with_index
from lminfluence.index.codecs import make_codec
from lminfluence.index.plan import IndexPlan
from lminfluence.scoring.two_stage import TwoStageConfig

EXEC = li.Execution(batch_size=3, query_batch_size=2)


def neg_logp(model, ex):
    return lm_summed_nll(model, torch.as_tensor(ex["input_ids"]), torch.as_tensor(ex["labels"]))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request):
    """A tiny float64 model (Llama: nn.Linear, gate/up sharing ā; GPT-2: Conv1D with biases), EK-FAC factors,
    10 training sequences and 3 queries."""
    model = tiny_llama() if request.param == "llama" else tiny_gpt2()
    train = random_sequences(10)
    queries = random_queries(3)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac"), execution=EXEC)
    return model, factors, train, queries


def index_scores(setup, tmp_path, config: IndexConfig, score_config=li.ScoreConfig()):
    model, factors, train, queries = setup
    index = build_index(model, factors, train, tmp_path / "idx", config, execution=EXEC)
    return score_with_index(model, factors, index, queries, score_config, execution=EXEC, train=train)


@pytest.mark.parametrize("method,reduction", [("full", 1.0), ("eigen", 1.0)])
def test_uncompressed_index_reproduces_compute_scores(setup, tmp_path, method, reduction):
    """Every coordinate of R = Q_Sᵀ DW Q_A kept in float64: the index's scores are compute_scores' (total and
    per layer) up to float64 round-off of two orders of summation (1e-10 relative)."""
    model, factors, train, queries = setup
    config = li.ScoreConfig(per_layer=True)
    want = li.compute_scores(model, factors, queries, train, config, execution=EXEC)
    got = index_scores(setup, tmp_path, IndexConfig(method=method, reduction=reduction, dtype="float64", shard_mib=0.005), config)
    scale = float(want.total.abs().max())
    allclose_report(got.total, want.total, rtol=0, atol=1e-10 * scale, what="total")
    for name in want.per_layer:
        allclose_report(got.per_layer[name], want.per_layer[name], rtol=0, atol=1e-10 * scale, what=name)
    assert got.meta["damping"] == want.meta["damping"]


def dense(q) -> torch.Tensor:
    """A basis as one float64 matrix (block-diagonal factors keep a tuple of blocks)."""
    return torch.block_diag(*q).double() if isinstance(q, (tuple, list)) else q.double()


def brute_force_scores(setup, method: str, reduction: float) -> torch.Tensor:
    """Σ_layers of each compression's definition, from per-sequence backward passes, [Q, N]."""
    model, factors, train, queries = setup
    modules = resolve_modules(model, list(factors.layers))
    q_grads = loop_gradients(model, modules, queries, neg_logp)
    t_grads = loop_gradients(model, modules, train, lm_loss_fn)
    plan = IndexPlan.of(factors, IndexConfig(method=method, reduction=reduction, dtype="float64"))
    total = torch.zeros(len(queries), len(train), dtype=torch.float64)
    for name in modules:
        st = factors.curvature.state[name]
        q_a, q_s, lam = dense(st["q_a"]), dense(st["q_s"]), st["lambda"].double()
        damping = 0.1 * float(lam.mean())
        codec = plan.codecs[name]
        for i, qg in enumerate(q_grads):
            m = (q_s.T @ qg[name] @ q_a) / (lam + damping)  # Eq 21 in the eigenbasis
            p = q_s @ m @ q_a.T
            for j, tg in enumerate(t_grads):
                dw = tg[name]
                r = q_s.T @ dw @ q_a
                if method == "eigen":  # the k largest Λ, ties to the lower position
                    keep = np.argsort(-lam.flatten().numpy(), kind="stable")[: codec.k]
                    total[i, j] += (m.flatten()[keep] * r.flatten()[keep]).sum()
                elif method == "eigen_topk":  # this sequence's k largest R² Λ / (Λ + λ_sel)²
                    weight = r.square() * lam / (lam + damping) ** 2
                    keep = np.argsort(-weight.flatten().numpy())[: codec.k]
                    total[i, j] += (m.flatten()[keep] * r.flatten()[keep]).sum()
                elif method == "svd":  # Eckart–Young: the truncated SVD of DW
                    u, s, vh = torch.linalg.svd(dw)
                    total[i, j] += (p * ((u[:, : codec.r] * s[: codec.r]) @ vh[: codec.r])).sum()
                elif method == "whitened_svd":  # the truncated SVD of R' = diag(α) R diag(β), unwhitened, against M
                    alpha, beta = plan.aux[name]["alpha"].double(), plan.aux[name]["beta"].double()
                    u, s, vh = torch.linalg.svd(alpha[:, None] * (q_s.T @ dw @ q_a) * beta[None, :])
                    r_hat = ((u[:, : codec.r] * s[: codec.r]) @ vh[: codec.r]) / torch.outer(alpha, beta)
                    total[i, j] += (m * r_hat).sum()
                elif method == "random":  # ⟨Π_out P Π_inᵀ, Π_out DW Π_inᵀ⟩ with the index's own projections
                    p_out, p_in = plan.aux[name]["proj_out"].double(), plan.aux[name]["proj_in"].double()
                    total[i, j] += ((p_out @ p @ p_in.T) * (p_out @ dw @ p_in.T)).sum()
    return total


@pytest.mark.parametrize("method", ["eigen", "eigen_topk", "svd", "whitened_svd", "random"])
def test_each_compression_equals_its_definition(setup, tmp_path, method):
    """Stored in float64, each compression's scores equal its dense brute-force definition (1e-10 relative);
    reduction 4 keeps a quarter of the bytes, so the approximation is far from exact (checked too)."""
    got = index_scores(setup, tmp_path, IndexConfig(method=method, reduction=4.0, dtype="float64")).total
    want = brute_force_scores(setup, method, 4.0)
    scale = float(want.abs().max())
    allclose_report(got, want, rtol=0, atol=1e-10 * scale, what=method)
    exact = li.compute_scores(*setup[:1], setup[1], setup[3], setup[2], execution=EXEC).total
    assert float((got - exact).abs().max()) > 1e-6 * float(exact.abs().max())  # a real compression, not the full scores


@pytest.mark.parametrize("method", ["eigen", "eigen_topk", "svd", "whitened_svd", "random"])
def test_block_diagonal_factors(setup, tmp_path, method):
    """With A and S cut into 2 diagonal blocks each (Appendix A) the eigenbasis is block-diagonal: each compression
    still equals its brute-force definition in the dense block-diagonal basis (1e-10 relative)."""
    model, _, train, queries = setup
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac", blocks=2), execution=EXEC)
    assert any(isinstance(st["q_a"], (tuple, list)) for st in factors.curvature.state.values())
    blocked = (model, factors, train, queries)
    got = index_scores(blocked, tmp_path, IndexConfig(method=method, reduction=4.0, dtype="float64")).total
    want = brute_force_scores(blocked, method, 4.0)
    allclose_report(got, want, rtol=0, atol=1e-10 * float(want.abs().max()), what=method)


def test_float16_storage_is_close_to_float64(setup, tmp_path):
    """float16 coefficients with one float32 scale per sequence and layer: each value within 2⁻¹¹ of its row's
    largest, so scores stay within 1e-2 of the float64 index's (relative to the largest score)."""
    f64 = index_scores(setup, tmp_path / "a", IndexConfig(method="eigen", reduction=4.0, dtype="float64")).total
    f16 = index_scores(setup, tmp_path / "b", IndexConfig(method="eigen", reduction=4.0, dtype="float16")).total
    allclose_report(f16, f64, rtol=0, atol=1e-2 * float(f64.abs().max()), what="float16")


def test_sizes_are_equal_across_methods_for_a_real_layer_shape():
    """At the same reduction every codec stores the same bytes per sequence within 5 % (SmolLM2's MLP
    shapes, float16): the comparison of compressions is at equal size."""
    for out_dim, in_dim in ((1536, 576), (576, 1536)):
        full = out_dim * in_dim * 2
        for reduction in (25.0, 50.0, 100.0):
            sizes = {m: make_codec(m, out_dim, in_dim, reduction, 2).bytes_per_sequence(2, True) for m in ("eigen", "eigen_topk", "svd", "random")}
            for method, size in sizes.items():
                assert abs(size / (full / reduction) - 1) < 0.05, (method, reduction, size, full / reduction)


def test_two_stage_with_index_rescores_the_top_exactly(setup, tmp_path):
    """The index ranks; each query's top and bottom M are re-scored at full rank by the model: those scores,
    and the shown sequences' per-layer and per-token details, equal compute_scores' (1e-10 relative)."""
    model, factors, train, queries = setup
    index = build_index(model, factors, train, tmp_path / "idx", IndexConfig(method="eigen", reduction=4.0), execution=EXEC)
    result = two_stage_with_index(model, factors, index, queries, train, li.ScoreConfig(), TwoStageConfig(rescore_top=4, top=2), execution=EXEC)
    exact = li.compute_scores(model, factors, queries, train, li.ScoreConfig(per_layer=True, per_token=True), execution=EXEC)
    scale = float(exact.total.abs().max())
    assert result.columns.tolist() == list(range(len(train)))
    for q, shown in enumerate(result.shown):
        rescored = np.flatnonzero(result.final[q] != result.first[q])
        assert len(rescored) > 0
        allclose_report(torch.as_tensor(result.final[q, rescored]), exact.total[q, rescored], 0, 1e-10 * scale, "re-scored")
        allclose_report(torch.as_tensor(shown.total), exact.total[q, shown.indices], 0, 1e-10 * scale, "shown")
        for name, values in shown.per_layer.items():
            allclose_report(torch.as_tensor(values), exact.per_layer[name][q, shown.indices], 0, 1e-10 * scale, name)
        tokens = exact.per_token[q, shown.indices][:, : shown.per_token.shape[1]]
        allclose_report(torch.as_tensor(shown.per_token), tokens, 0, 1e-10 * scale, "per token")
        top = shown.indices[shown.ranks > 0]
        assert (np.diff(result.final[q, top]) <= 0).all()  # shown best first, by their full-rank scores


def test_bad_settings_are_refused(setup, tmp_path):
    """Unknown methods, reductions below 1, strategies without an eigenbasis and scoring options that need the
    model over the training data are ConfigErrors naming the option."""
    model, factors, train, queries = setup
    with pytest.raises(ConfigError, match="method"):
        IndexConfig(method="pca")
    with pytest.raises(ConfigError, match="reduction"):
        IndexConfig(reduction=0.5)
    identity = li.fit_factors(model, train, li.FactorConfig(strategy="identity"), execution=EXEC)
    with pytest.raises(ConfigError, match="eigenbasis"):
        build_index(model, identity, train, tmp_path / "i", execution=EXEC)
    index = build_index(model, factors, train, tmp_path / "ok", execution=EXEC)
    with pytest.raises(ConfigError, match="query_rank"):
        score_with_index(model, factors, index, queries, li.ScoreConfig(query_rank=2))
    with pytest.raises(ConfigError, match="rank"):
        build_index(model, factors, train, tmp_path / "r", rank=2, world_size=2)


def test_topk_positions_survive_their_two_byte_encoding():
    """eigen_topk keeps positions as int16 offsets within blocks of 2¹⁶ plus per-block counts: decoding gives
    back exactly the kept positions, across block boundaries (a 300 × 400 layer has two blocks)."""
    codec = make_codec("eigen_topk", 300, 400, 20.0, 2)
    assert codec.blocks == 2
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 300 * 400, generator=g, dtype=torch.float64)
    aux = {"weight": torch.rand(300 * 400, generator=g)}
    idx = codec.select(r, aux)
    arrays = codec.arrays(r, idx)
    assert arrays["offset"].dtype == torch.int16 and arrays["count"].sum(1).tolist() == [codec.k] * 5
    assert torch.equal(codec.positions(arrays), idx.sort(dim=1).values)
    assert torch.equal(arrays["values"], r.gather(1, idx.sort(dim=1).values))
    assert ((idx >= 1 << 16).any(1) & (idx < 1 << 16).any(1)).all()  # both blocks used by every row


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_score_by_blocks_equals_the_dense_product(dtype):
    """eigen_topk's score permutes the kept entries block by block (2¹⁶ positions each) and multiplies each
    block's sparse rows with the queries' rows of that block: it equals Σ_p M_q[p] R_z[p] over the kept
    positions, with blocks that some sequences leave empty and a last block cut short."""
    codec = make_codec("eigen_topk", 700, 400, 10.0, 2)  # 280,000 positions: 5 blocks, the last of 17,856
    assert codec.blocks == 5
    g = torch.Generator().manual_seed(1)
    D, split = 700 * 400, 2 << 16
    r = torch.randn(7, D, generator=g, dtype=torch.float64)
    late = [split + torch.randperm(D - split, generator=g)[: codec.k] for _ in range(6)]  # blocks 2 to 4 only
    early = torch.randperm(split, generator=g)[: codec.k]  # blocks 0 and 1 only
    arrays = codec.arrays(r, torch.stack([*late, early]))
    counts = arrays["count"]
    assert (counts[:6, :2] == 0).all() and (counts[6, 2:] == 0).all() and (counts[:6, 4] > 0).all()
    m = torch.randn(3, D, generator=g, dtype=torch.float64)
    kept = torch.zeros_like(r).scatter_(1, codec.positions(arrays), arrays["values"])
    prepared = codec.join([m[:2].T.contiguous(), m[2:].T.contiguous()]).to(dtype)  # what prepare gives: [O·I, Q]
    expected = m @ kept.T
    got = codec.score(prepared, {**arrays, "values": arrays["values"].to(dtype)})
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_topk_score_of_one_sequence_keeping_everything_and_in_half_precision():
    """n = 1 with k = O·I (every coordinate kept: the exact inner product), and float16 queries (multiplied in float32)."""
    codec = make_codec("eigen_topk", 300, 400, 0.5, 8)  # a budget above the full size: every coordinate
    assert codec.k == 300 * 400
    g = torch.Generator().manual_seed(2)
    r = torch.randn(1, 300 * 400, generator=g, dtype=torch.float64)
    arrays = codec.arrays(r, codec.select(r, {"weight": torch.rand(300 * 400, generator=g)}))
    m = torch.randn(2, 300 * 400, generator=g, dtype=torch.float64)
    torch.testing.assert_close(codec.score(m.T.contiguous(), arrays), m @ r.T, rtol=1e-12, atol=1e-9)
    half = codec.score(m.T.contiguous().half(), {**arrays, "values": arrays["values"].half()})
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), m @ r.T, rtol=2e-2, atol=2e-2 * float((m @ r.T).abs().max()))


def test_topk_position_past_the_layer_is_refused():
    """A kept position beyond O·I (only a damaged file can hold one) is refused, not read past the queries' rows."""
    codec = make_codec("eigen_topk", 300, 400, 20.0, 2)  # 120,000 positions: the second block holds 54,464
    r = torch.randn(2, 300 * 400, dtype=torch.float64)
    arrays = codec.arrays(r, torch.stack([torch.arange(codec.k), torch.arange(codec.k) + 300 * 400 - codec.k]))
    arrays["offset"][1, -1] = (1 << 15) - 1  # offset 65,535 in the last block: position 131,071
    with pytest.raises(CorruptFileError, match="past the end"):
        codec.score(torch.randn(300 * 400, 2, dtype=torch.float64), arrays)
