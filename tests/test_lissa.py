"""LiSSA (Eq 10): the Neumann series against dense (G + λI)⁻¹ solves over all tracked layers jointly."""

import pytest
import torch
from helpers import (
    ScalarRegressionTask,
    allclose_report,
    flat,
    lm_gauss_newton,
    lm_summed_nll,
    loop_gradients,
    random_queries,
    random_sequences,
    regression_data,
    tiny_gpt2,
)
from torch import nn

import lminfluence as li
from lminfluence.errors import InputError, LissaDivergenceError
from lminfluence.hooks import resolve_modules
from lminfluence.scoring import precondition_queries
from lminfluence.scoring.pairwise import score_preconditioned


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False), nn.Linear(2, 1)).double()


def output(m, ex):
    return m(ex["x"]).sum()


def squared_error(m, ex):
    return 0.5 * (m(ex["x"]).sum() - ex["y"]) ** 2


def dense_regression(model, modules, data, queries):
    """The exact GN (1/N) Σ J_iᵀ J_i of ½(h - y)² over all tracked layers (cross-layer blocks included),
    ∇f of each query and ∇L of each training example, flattened W̄ row-major in layer order."""
    names = list(modules)
    jac = torch.stack([flat(g, names) for g in loop_gradients(model, modules, data, output)])
    grad_f = torch.stack([flat(g, names) for g in loop_gradients(model, modules, queries, output)])
    grad_l = torch.stack([flat(g, names) for g in loop_gradients(model, modules, data, squared_error)])
    return jac.T @ jac / len(data), grad_f, grad_l


def stacked(pq, names, num_queries):
    return torch.cat([pq[n].dense.reshape(num_queries, -1) for n in names], dim=1)


def test_lissa_converges_to_dense_solve_on_damped_mlp():
    """With the whole training set as the mini-batch, α r_J → (G + λI)⁻¹ ∇g with G the exact GN of the
    mean summed loss over all layers jointly (tanh MLP: the blocks between layers are not zero), and
    the scores are -∇fᵀ(G+λI)⁻¹∇L. Checks the scale of G (mean over sequences) and the W̄ layout."""
    model = mlp()
    data = regression_data(20, 3)
    queries = regression_data(3, 3, seed=9)
    task = ScalarRegressionTask()
    modules = resolve_modules(model, ["*"])
    gn, grad_f, grad_l = dense_regression(model, modules, data, queries)
    off_diagonal = gn[:16, 16:].abs().max()
    assert off_diagonal > 1e-3  # the layers are coupled: a block-diagonal solve would not pass
    damping = 0.1
    h = gn + damping * torch.eye(gn.shape[0], dtype=torch.float64)

    cfg = li.FactorConfig(strategy="lissa", modules=["*"], lissa_batch_size=len(data), lissa_depth=300)
    factors = li.fit_factors(model, data, cfg, task=task)
    sc = li.ScoreConfig(damping=damping)
    meta: dict = {}
    pq = precondition_queries(model, factors, queries, sc, task=task, curvature_data=data, meta=meta)
    want = torch.linalg.solve(h, -grad_f.T).T  # ∇g = -∇f
    # tolerance: (1 - α λ)^300 ≈ 1e-12 truncation; α from the automatic scale
    allclose_report(stacked(pq, list(modules), len(queries)), want, rtol=1e-7, atol=1e-9, what="IHVP")
    scores = score_preconditioned(model, factors, pq, data, sc, task=task)
    allclose_report(scores.total, -grad_f @ torch.linalg.solve(h, grad_l.T), rtol=1e-7, atol=1e-9, what="scores")
    rep = meta["lissa"]
    assert rep["max_eigenvalue_estimate"] == pytest.approx(float(torch.linalg.eigvalsh(gn).max()), rel=1e-3)
    assert rep["last_relative_update"] < 1e-8


def test_lissa_converges_to_dense_solve_on_gpt2_cross_entropy():
    """GPT-2 (Conv1D, biases, padded batch): LiSSA's products use H_out = diag(p) - ppᵀ per
    loss-carrying position; α r_J equals the dense solve with G from one backward per
    (sequence, position, class)."""
    model = tiny_gpt2(hidden=8, layers=1)
    train = random_sequences(3)
    queries = random_queries(2)
    modules = resolve_modules(model, None)
    gn = lm_gauss_newton(model, modules, train)
    damping = float(torch.linalg.eigvalsh(gn).max()) / 5  # keeps the depth needed small
    cfg = li.FactorConfig(strategy="lissa", lissa_batch_size=8, lissa_depth=100)
    factors = li.fit_factors(model, train, cfg)
    pq = precondition_queries(model, factors, queries, li.ScoreConfig(damping=damping), curvature_data=train)

    def neg_logp(m, ex):
        return lm_summed_nll(m, torch.as_tensor(ex["input_ids"]), torch.as_tensor(ex["labels"]))

    grads = torch.stack([flat(g, list(modules)) for g in loop_gradients(model, modules, queries, neg_logp)])
    want = torch.linalg.solve(gn + damping * torch.eye(gn.shape[0], dtype=torch.float64), grads.T).T
    # tolerance: (1 - 1/6)^100 ≈ 1e-8 truncation
    allclose_report(stacked(pq, list(modules), len(queries)), want, rtol=1e-6, atol=1e-8, what="IHVP")


def test_lissa_reports_divergence_when_the_scale_is_too_large():
    """α(μ_max + λ) > 2 makes |1 - α(μ + λ)| > 1 on the top eigenvector: the recursion must raise
    LissaDivergenceError naming the fix instead of returning numbers."""
    model = mlp()
    data = regression_data(20, 3)
    task = ScalarRegressionTask()
    modules = resolve_modules(model, ["*"])
    mu_max = float(torch.linalg.eigvalsh(dense_regression(model, modules, data, data[:1])[0]).max())
    cfg = li.FactorConfig(strategy="lissa", modules=["*"], lissa_batch_size=20, lissa_depth=300, lissa_scale=3.0 / mu_max)
    factors = li.fit_factors(model, data, cfg, task=task)
    with pytest.raises(LissaDivergenceError, match="lissa_scale"):
        li.compute_scores(model, factors, data[:2], data, li.ScoreConfig(damping=0.1), task=task)
    # just below the limit the same setup converges
    ok = li.FactorConfig(strategy="lissa", modules=["*"], lissa_batch_size=20, lissa_depth=30, lissa_scale=1.5 / mu_max)
    scores = li.compute_scores(model, li.fit_factors(model, data, ok, task=task), data[:2], data, li.ScoreConfig(damping=0.1), task=task)
    assert torch.isfinite(scores.total).all()


def test_lissa_scores_match_ekfac_on_deep_linear_network():
    """One tracked layer of a deep linear network: K-FAC/EK-FAC are the exact GN there, and LiSSA's
    relative damping is the same λ (its mean eigenvalue is trace(G)/D, = mean(Λ) of EK-FAC), so the
    two strategies give the same scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False), nn.Linear(2, 1)).double()
    data = regression_data(30, 3)
    queries = regression_data(4, 3, seed=9)
    task = ScalarRegressionTask()
    sc = li.ScoreConfig(damping_scale=1.0)
    ekfac = li.fit_factors(model, data, li.FactorConfig(strategy="ekfac", modules=["1"]), task=task)
    lissa_cfg = li.FactorConfig(strategy="lissa", modules=["1"], lissa_batch_size=30, lissa_depth=200)
    lissa = li.fit_factors(model, data, lissa_cfg, task=task)
    want = li.compute_scores(model, ekfac, queries, data, sc, task=task)
    got = li.compute_scores(model, lissa, queries, data, sc, task=task)
    assert got.meta["damping"]["1"] == pytest.approx(want.meta["damping"]["1"], rel=1e-12)
    allclose_report(got.total, want.total, rtol=1e-7, atol=1e-9, what="lissa vs ekfac")


def test_stochastic_minibatch_lissa_approximates_the_solve():
    """Mini-batches of 5 out of 20 make each product noisy but unbiased: averaged over repeats the
    result stays close to the dense solve."""
    model = mlp()
    data = regression_data(20, 3)
    queries = regression_data(3, 3, seed=9)
    task = ScalarRegressionTask()
    modules = resolve_modules(model, ["*"])
    gn, grad_f, grad_l = dense_regression(model, modules, data, queries)
    damping = 0.1
    want = -grad_f @ torch.linalg.solve(gn + damping * torch.eye(gn.shape[0], dtype=torch.float64), grad_l.T)
    cfg = li.FactorConfig(strategy="lissa", modules=["*"], lissa_batch_size=5, lissa_depth=150, lissa_repeats=2)
    factors = li.fit_factors(model, data, cfg, task=task)
    got = li.compute_scores(model, factors, queries, data, li.ScoreConfig(damping=damping), task=task).total
    rel = float((got - want).norm() / want.norm())
    # tolerance: the sampling noise of 300 mini-batch products (measured 0.04–0.09 for seeds 0–3)
    assert rel < 0.15, rel


def test_reloaded_lissa_factors_score_as_fresh_ones(tmp_path):
    """Saved LiSSA factors keep the damping statistics, not the data: the recursion runs at scoring
    time on the training data given, so reloaded factors give the same scores (the mini-batch
    sequence is seeded, also independent of how the queries are batched). Without data, the
    preconditioning names the fix."""
    model = mlp()
    data = regression_data(12, 3)
    queries = regression_data(3, 3, seed=9)
    task = ScalarRegressionTask()
    cfg = li.FactorConfig(strategy="lissa", modules=["*"], lissa_batch_size=4, lissa_depth=40)
    factors = li.fit_factors(model, data, cfg, task=task, output_dir=tmp_path)
    sc = li.ScoreConfig(damping_scale=0.5)
    first = li.compute_scores(model, factors, queries, data, sc, task=task)
    loaded = li.load_factors(tmp_path, model)
    assert loaded.config == cfg
    again = li.compute_scores(model, loaded, queries, data, li.ScoreConfig(damping_scale=0.5), task=task, execution=li.Execution(query_batch_size=1))
    torch.testing.assert_close(again.total, first.total, rtol=1e-10, atol=1e-12)
    assert again.meta["damping"] == first.meta["damping"]
    with pytest.raises(InputError, match="training data"):
        precondition_queries(model, loaded, queries, sc, task=task)


def test_lissa_configuration_errors():
    """Invalid LiSSA settings fail at construction; self-influence and zero damping name the fix."""
    for bad in (dict(lissa_scale=0.0), dict(lissa_depth=0), dict(lissa_repeats=1.5), dict(lissa_batch_size=-1)):
        with pytest.raises(ValueError):
            li.FactorConfig(strategy="lissa", **bad)
    with pytest.raises(ValueError, match="empirical"):
        li.FactorConfig(strategy="lissa", fisher="empirical")
    model = mlp()
    data = regression_data(6, 3)
    task = ScalarRegressionTask()
    factors = li.fit_factors(model, data, li.FactorConfig(strategy="lissa", modules=["*"], lissa_depth=5), task=task)
    with pytest.raises(InputError, match="self-influence"):
        li.compute_self_scores(model, factors, data, task=task)
    with pytest.raises(ValueError, match="positive damping"):
        li.compute_scores(model, factors, data[:1], data, li.ScoreConfig(damping=0.0), task=task)
