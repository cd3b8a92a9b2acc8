"""Exact tier: scores against -∇fᵀ(G + λI)⁻¹∇L computed from dense matrices."""

import pytest
import torch
from helpers import (
    ScalarRegressionTask,
    allclose_report,
    dense_factor_matrix,
    lm_loss_fn,
    lm_summed_nll,
    loop_gradients,
    random_queries,
    random_sequences,
    regression_data,
    tiny_gpt2,
)
from torch import nn

import lminfluence as li
from lminfluence.hooks import resolve_modules


def neg_logp(model, ex):
    """g = -log p(completion | prompt), computed directly (not through the task)."""
    return lm_summed_nll(model, torch.as_tensor(ex["input_ids"]), torch.as_tensor(ex["labels"]))


def dense_scores(model, factors, queries, train, dampings):
    """-∇fᵀ (G + λI)⁻¹ ∇L per layer block from the factors' dense matrices, summed: [Q, N]."""
    modules = resolve_modules(model, list(factors.layers))
    q_grads = loop_gradients(model, modules, queries, neg_logp)  # ∇g = -∇f
    t_grads = loop_gradients(model, modules, train, lm_loss_fn)  # ∇L
    total = torch.zeros(len(queries), len(train), dtype=torch.float64)
    for n in modules:
        g_mat = dense_factor_matrix(factors, n)
        h = g_mat + dampings[n] * torch.eye(g_mat.shape[0], dtype=torch.float64)
        vq = torch.stack([g[n].reshape(-1) for g in q_grads])  # [Q, D]
        vt = torch.stack([g[n].reshape(-1) for g in t_grads])  # [N, D]
        total += torch.linalg.solve(h, vq.T).T @ vt.T
    return total


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_scores_equal_dense_inverse_on_gpt2(strategy):
    """compute_scores = -∇fᵀ(G+λI)⁻¹∇L with G the strategy's dense block-diagonal matrix,
    λ = 0.1 × mean eigenvalue per block (identity: no preconditioning at all)."""
    model = tiny_gpt2()
    train = random_sequences(6)
    queries = random_queries(3)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy=strategy), execution=li.Execution(batch_size=4))
    scores = li.compute_scores(model, factors, queries, train, li.ScoreConfig(), execution=li.Execution(batch_size=4))
    if strategy == "identity":
        modules = resolve_modules(model, None)
        q = loop_gradients(model, modules, queries, neg_logp)
        t = loop_gradients(model, modules, train, lm_loss_fn)
        want = torch.tensor([[sum((qi[n] * ti[n]).sum() for n in modules) for ti in t] for qi in q])
    else:
        dampings = {n: 0.1 * float(factors.curvature.state[n]["lambda"].mean()) for n in factors.layers}
        assert scores.meta["damping"] == pytest.approx(dampings)
        want = dense_scores(model, factors, queries, train, dampings)
    allclose_report(scores.total, want, rtol=1e-7, atol=1e-9, what=strategy)


def test_score_equals_exact_gauss_newton_inverse_on_linear_network():
    """With one tracked layer of a deep linear network, K-FAC is the exact GN, so the
    score is -∇fᵀ(G + λI)⁻¹∇L with G from per-example Jacobians (absolute damping)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False), nn.Linear(2, 1)).double()
    data = regression_data(30, 3)
    queries = regression_data(4, 3, seed=9)
    task = ScalarRegressionTask()
    factors = li.fit_factors(model, data, li.FactorConfig(strategy="kfac", modules=["1"]), task=task)
    damping = 1e-3
    scores = li.compute_scores(model, factors, queries, data, li.ScoreConfig(damping=damping), task=task)

    layer = {"1": model[1]}
    jac = torch.stack([g["1"].reshape(-1) for g in loop_gradients(model, layer, data, lambda m, ex: m(ex["x"]).sum())])
    gn = jac.T @ jac / len(data)
    grad_f = torch.stack([g["1"].reshape(-1) for g in loop_gradients(model, layer, queries, lambda m, ex: m(ex["x"]).sum())])
    grad_l = torch.stack(
        [g["1"].reshape(-1) for g in loop_gradients(model, layer, data, lambda m, ex: 0.5 * (m(ex["x"]).sum() - ex["y"]) ** 2)]
    )
    want = -grad_f @ torch.linalg.solve(gn + damping * torch.eye(gn.shape[0], dtype=torch.float64), grad_l.T)
    allclose_report(scores.total, want, rtol=1e-8, atol=1e-10, what="linear-network score")


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "ekfac"])
def test_self_influence_equals_dense_quadratic_form(strategy):
    """Self-influence = ∇Lᵀ(G+λI)⁻¹∇L with the strategy's dense blocks (identity: ‖∇L‖²);
    per layer sums to total."""
    model = tiny_gpt2()
    train = random_sequences(5)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy=strategy), execution=li.Execution(batch_size=5))
    self_scores = li.compute_self_scores(model, factors, train, li.ScoreConfig(per_layer=True), execution=li.Execution(batch_size=2))
    modules = resolve_modules(model, None)
    grads = loop_gradients(model, modules, train, lm_loss_fn)
    want = torch.zeros(len(train), dtype=torch.float64)
    for n in modules:
        v = torch.stack([g[n].reshape(-1) for g in grads])
        if strategy == "identity":
            want += v.square().sum(1)
            continue
        g_mat = dense_factor_matrix(factors, n)
        h = g_mat + self_scores.meta["damping"][n] * torch.eye(g_mat.shape[0], dtype=torch.float64)
        want += (v * torch.linalg.solve(h, v.T).T).sum(1)
    allclose_report(self_scores.total, want, rtol=1e-7, atol=1e-9, what="self-influence")
    torch.testing.assert_close(sum(self_scores.per_layer.values()), self_scores.total)
    assert (self_scores.total > 0).all()


def test_per_token_scores_equal_dense_preconditioned_dot_per_position():
    """Per-token term t = ⟨P, ds_t ā_tᵀ⟩ with P from a dense solve and the per-position
    gradient ds_t ā_tᵀ (itself checked against a perturbation in test_gradients)."""
    from lminfluence.hooks import Collector
    from lminfluence.passes import run_pass
    from lminfluence.task import CausalLMTask

    model = tiny_gpt2()
    train = random_sequences(4)
    query = random_queries(1)
    factors = li.fit_factors(model, train)
    scores = li.compute_scores(model, factors, query, train, li.ScoreConfig(per_token=True), execution=li.Execution(batch_size=3))
    modules = resolve_modules(model, None)
    qg = loop_gradients(model, modules, query, neg_logp)[0]
    want = torch.zeros(len(train), scores.per_token.shape[-1], dtype=torch.float64)
    with Collector(modules) as col:
        for i, ex in enumerate(train):
            caps = next(run_pass(model, CausalLMTask(), col, [ex], 1, "true")).captures
            for n in modules:
                g_mat = dense_factor_matrix(factors, n)
                h = g_mat + scores.meta["damping"][n] * torch.eye(g_mat.shape[0], dtype=torch.float64)
                p = torch.linalg.solve(h, qg[n].reshape(-1)).reshape(qg[n].shape)
                want[i, : caps[n].a.shape[1]] += torch.einsum("to,oi,ti->t", caps[n].ds[0], p, caps[n].a[0])
    allclose_report(scores.per_token[0], want, rtol=1e-7, atol=1e-9, what="per-token")
    for i, ex in enumerate(train):  # padding positions carry exactly zero
        assert (scores.per_token[0, i, len(ex["input_ids"]) :] == 0).all()


def test_precondition_queries_is_the_dense_solve_of_each_query_gradient():
    """precondition_queries (the reusable first half of compute_scores) returns, per layer,
    (G+λI)⁻¹∇g for every query, with G the dense EK-FAC block."""
    from lminfluence.scoring import precondition_queries

    model = tiny_gpt2()
    train = random_sequences(5)
    queries = random_queries(3)
    factors = li.fit_factors(model, train)
    pq = precondition_queries(model, factors, queries, li.ScoreConfig(), execution=li.Execution(query_batch_size=2))
    modules = resolve_modules(model, None)
    grads = loop_gradients(model, modules, queries, neg_logp)
    for n in modules:
        g_mat = dense_factor_matrix(factors, n)
        h = g_mat + 0.1 * float(factors.curvature.state[n]["lambda"].mean()) * torch.eye(g_mat.shape[0], dtype=torch.float64)
        want = torch.stack([torch.linalg.solve(h, g[n].reshape(-1)).reshape(g[n].shape) for g in grads])
        allclose_report(pq[n].dense, want, rtol=1e-7, atol=1e-9, what=n)
