"""The accuracy study's pieces at a tiny size (benchmarks/accuracy_study.py, docs/accuracy.md).

Checks that the data, training, tasks, estimator runs, exact reference and
result tables are well formed and mean what they say; no wall-clock asserts.
"""

import math

import numpy as np
import pytest
import torch
from accuracy import tasks as mlp  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
from accuracy.exact import exact_influence
from accuracy.study import Setup, per_query_pearson, run_estimator, split_method
from accuracy.tables import correlation_table, time_table


@pytest.fixture(scope="module")
def diabetes():
    """A diabetes MLP trained for a few epochs, with its splits and a 40-point training set."""
    from dataclasses import replace

    spec = replace(mlp.SPECS["diabetes"], hidden=16, epochs=30)
    splits = mlp.load_splits("diabetes")
    model = mlp.train_mlp(spec, splits["train"], 1, lr=0.01, weight_decay=1e-3, seed=0)
    return spec, splits, model


def test_splits_are_disjoint_standardised_and_cover_the_data():
    """Train/val/test partition the 442 diabetes rows; train features have mean 0, std 1."""
    splits = mlp.load_splits("diabetes")
    assert sum(len(s.y) for s in splits.values()) == 442
    rows = {k: {tuple(np.round(x.numpy(), 10)) for x in s.x} for k, s in splits.items()}
    assert not (rows["train"] & rows["test"]) and not (rows["train"] & rows["val"])
    x = splits["train"].x
    torch.testing.assert_close(x.mean(0), torch.zeros(x.shape[1], dtype=x.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(x.shape[1], dtype=x.dtype), atol=1e-10, rtol=0)
    digits = mlp.load_splits("digits")
    assert digits["train"].y.dtype == torch.long and int(digits["train"].y.max()) == 9


def test_trained_mlp_beats_a_constant_predictor(diabetes):
    spec, splits, model = diabetes
    assert mlp.evaluate(spec, model, splits["test"])["loss"] < 0.8 * mlp.constant_baseline(spec, splits["train"], splits["test"])


def test_tasks_losses_and_measurements():
    """Regression: L = ½(h-y)², f = -L, pseudo-gradient dL/dh = 1. Classification: f = log p(y), L = -f."""
    reg, cls = mlp.RegressionTask(), mlp.ClassificationTask()
    h = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    batch = reg.collate([{"x": torch.zeros(2), "y": 1.0}, {"x": torch.zeros(2), "y": 0.0}])
    torch.testing.assert_close(reg.loss(h, batch), torch.tensor([0.125, 0.5], dtype=torch.float64))
    torch.testing.assert_close(reg.measurement(h, batch), -reg.loss(h, batch))
    (g,) = torch.autograd.grad(reg.sampled_loss(h, batch, torch.Generator()).sum(), h)
    torch.testing.assert_close(g, torch.ones(2, dtype=torch.float64))
    logits = torch.randn(5, 3, dtype=torch.float64)
    cb = cls.collate([{"x": torch.zeros(2), "y": i % 3} for i in range(5)])
    torch.testing.assert_close(cls.measurement(logits, cb), torch.log_softmax(logits, 1)[torch.arange(5), cb["y"]])
    torch.testing.assert_close(cls.loss(logits, cb), -cls.measurement(logits, cb))
    # sampled labels follow the softmax: a class with ~all the mass is drawn ~always
    peaked = torch.tensor([[0.0, 20.0, 0.0]] * 200, dtype=torch.float64, requires_grad=True)
    pb = cls.collate([{"x": torch.zeros(2), "y": 0}] * 200)
    (gp,) = torch.autograd.grad(cls.sampled_loss(peaked, pb, torch.Generator().manual_seed(0)).sum(), peaked)
    assert float(gp.abs().max()) < 1e-6  # the drawn label is the predicted one: no gradient


def _setup(diabetes, n_train=40):
    spec, splits, model = diabetes
    return Setup(
        name="diabetes",
        model=model,
        task=mlp.make_task(spec),
        train=splits["train"].examples(range(n_train)),
        queries=splits["test"].examples(range(3)),
        modules=mlp.MODULES,
        scored=np.arange(n_train),
        batch_size=16,
        lissa={"lissa_depth": 50, "lissa_batch_size": 40},
    )


def test_estimators_are_well_formed_and_ekfac_tends_to_the_dot_product_under_heavy_damping(diabetes):
    """Every method gives finite [Q, N] scores; with λ ≫ the curvature, λ·EK-FAC → -∇f·∇L (identity)."""
    setup = _setup(diabetes)
    ident = run_estimator(setup, "identity", damping=1.0)["scores"]
    assert ident.shape == (3, 40) and torch.isfinite(ident).all()
    for method in ("diagonal", "kfac", "ekfac", "lissa"):
        r = run_estimator(setup, method, damping=1e-2)
        assert r["scores"].shape == (3, 40) and torch.isfinite(r["scores"]).all(), method
        assert r["fit_s"] >= 0 and r["score_s"] >= 0
    lam = 1e6
    ek = run_estimator(setup, "ekfac", damping=lam)["scores"] * lam
    torch.testing.assert_close(ek, ident, rtol=1e-3, atol=1e-9)


def test_exact_reference_matches_a_dense_solve_and_ekfac_is_closer_than_the_dot_product(diabetes):
    """CG scores = -∇fᵀ(JᵀJ/N + λI)⁻¹∇L from the dense Jacobian; EK-FAC correlates with them better
    than the gradient dot product does (the paper's finding, at a size where it already holds)."""
    from torch.func import functional_call, jacrev, vmap

    setup = _setup(diabetes)
    lam = 1e-2
    got = exact_influence(setup, lam, tol=1e-12)["scores"]
    model = setup.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.stack([e["x"] for e in setup.train])
    y = torch.stack([e["y"] for e in setup.train])

    def out(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(())

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, x)
    J = torch.cat([jac[k].reshape(len(x), -1) for k in params], 1)  # [N, P]
    h = model(x).reshape(-1).detach()
    grad_l = (h - y).unsqueeze(1) * J  # ∇½(h-y)²
    xq = torch.stack([e["x"] for e in setup.queries])
    yq = torch.stack([e["y"] for e in setup.queries])
    Jq = torch.cat([vmap(jacrev(out), in_dims=(None, 0))(params, xq)[k].reshape(len(xq), -1) for k in params], 1)
    grad_f = -(model(xq).reshape(-1).detach() - yq).unsqueeze(1) * Jq  # ∇(-½(h-y)²)
    G = J.T @ J / len(x)
    want = -grad_f @ torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), grad_l.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    ek = np.mean(per_query_pearson(run_estimator(setup, "ekfac", lam)["scores"], got))
    dot = np.mean(per_query_pearson(run_estimator(setup, "identity", lam)["scores"], got))
    assert ek > dot, (ek, dot)


def test_method_names_and_tables():
    assert split_method("ekfac") == ("ekfac", 1, None) and split_method("kfac_d16") == ("kfac", 16, None)
    assert split_method("ekfac_cg5") == ("ekfac", 1, 5) and split_method("ekfac_d16_cg20") == ("ekfac", 16, 20)
    with pytest.raises(ValueError, match="unknown method"):
        split_method("ekfac_x3")
    results = {
        "diabetes": {
            "pearson_pbrf": {"ekfac": {"mean": 0.9, "std": 0.05}, "identity": {"mean": 0.5, "std": 0.1}},
            "time": {"ekfac": {"fit_s": 1.0, "score_s": 0.5}, "pbrf": {"total_s": 100.0}},
        }
    }
    table = correlation_table(results, "pearson_pbrf", "t")
    assert "| EK-FAC | 0.90 ± 0.05 |" in table and "| gradient dot product | 0.50 ± 0.10 |" in table
    assert table.index("gradient dot product") < table.index("EK-FAC")
    assert "| EK-FAC | 1.50 (1.00 + 0.50) |" in time_table(results)
    assert not math.isnan(results["diabetes"]["pearson_pbrf"]["ekfac"]["mean"])
