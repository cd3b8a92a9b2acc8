"""LDS (docs/method.md §8): exact influence predicts retraining on a linear model; the ground truth is reused."""

import numpy as np
import pytest
import torch
from helpers import ScalarRegressionTask, spearman
from torch import nn

import lminfluence as li
from lminfluence.evaluation import GroundTruth, build_ground_truth, lds, make_subsets

RIDGE = 0.1


def linear_problem(n=100, d=5, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n + t, d, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n + t, generator=g, dtype=torch.float64)
    train = [{"x": x[i], "y": y[i]} for i in range(n)]
    tests = [{"x": x[n + i], "y": y[n + i]} for i in range(t)]
    return train, tests


def ridge_fit(examples):
    """argmin (1/K) Σ ½(θᵀx̄ - y)² + ½ RIDGE ‖θ‖², x̄ = (x, 1)."""
    X = torch.stack([torch.cat([e["x"], torch.ones(1, dtype=torch.float64)]) for e in examples])
    y = torch.stack([e["y"] for e in examples])
    return torch.linalg.solve(X.T @ X / len(X) + RIDGE * torch.eye(X.shape[1], dtype=torch.float64), X.T @ y / len(X))


def predictions(theta, tests):
    return np.array([float(theta[:-1] @ e["x"] + theta[-1]) for e in tests])


def test_lds_of_exact_influence_on_a_linear_model_is_near_one(tmp_path):
    """Ridge regression retrained on half-size subsets (the seed adds small training noise): the
    library's exact influence (one tracked linear layer, damping = the ridge, so (G + λI) is the
    training objective's Hessian) ranks the subsets' test predictions almost perfectly; random
    scores do not."""
    train, tests = linear_problem()
    theta = ridge_fit(train)
    model = nn.Sequential(nn.Linear(5, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(theta[:-1].unsqueeze(0))
        model[0].bias.copy_(theta[-1:])
    task = ScalarRegressionTask()
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac", modules=["*"]), task=task)
    scores = li.compute_scores(model, factors, tests, train, li.ScoreConfig(damping=RIDGE), task=task).total  # [T, N]

    def train_fn(indices, seed):
        noise = 1e-3 * np.random.default_rng(seed).standard_normal(6)
        return predictions(ridge_fit([train[i] for i in indices]) + torch.from_numpy(noise), tests)

    truth = build_ground_truth(train_fn, len(train), tmp_path, num_subsets=40, seeds_per_subset=2)
    assert truth.measurements.shape == (40, 2, 4) and truth.subsets.shape == (40, 50)
    assert len({tuple(s) for s in truth.subsets}) == 40  # distinct subsets
    result = lds(scores, truth)
    # measured 0.947–0.973 (mean 0.966): what first order misses of removing half the data
    assert result.mean > 0.9, result.per_measurement
    assert (result.per_measurement > 0.85).all()
    for t in range(4):  # the Spearman of the library's helper
        assert result.per_measurement[t] == pytest.approx(spearman(torch.from_numpy(result.predicted[:, t]), torch.from_numpy(result.actual[:, t])))
    noise = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert abs(lds(noise, truth).mean) < 0.35
    assert lds(-scores, truth).mean < -0.9  # the sign convention matters


def test_ground_truth_is_saved_resumed_and_reused(tmp_path):
    """Every retraining is written as it finishes: an interrupted build resumes without repeating
    one, a finished build trains nothing, GroundTruth.load returns the same arrays, and other
    settings in the same directory are refused."""
    calls = []

    class Stop(Exception):
        pass

    def train_fn(indices, seed, stop_after=None):
        if stop_after is not None and len(calls) == stop_after:
            raise Stop
        calls.append((tuple(indices), seed))
        return [float(np.sum(indices)) + seed % 7, float(len(indices))]

    with pytest.raises(Stop):
        build_ground_truth(lambda i, s: train_fn(i, s, stop_after=5), 12, tmp_path, num_subsets=4, seeds_per_subset=2)
    partial = GroundTruth.load(tmp_path)
    assert len(partial.missing) == 3 and not partial.complete
    with pytest.raises(ValueError, match="incomplete"):
        lds(np.zeros((2, 12)), partial)
    truth = build_ground_truth(train_fn, 12, tmp_path, num_subsets=4, seeds_per_subset=2)
    assert len(calls) == 8 and len(set(calls)) == 8  # 5 before the interruption + 3 after, none twice
    assert truth.complete and len(set(truth.seeds.reshape(-1).tolist())) == 8
    before = len(calls)
    again = build_ground_truth(train_fn, 12, tmp_path, num_subsets=4, seeds_per_subset=2)
    assert len(calls) == before
    loaded = GroundTruth.load(tmp_path)
    for a in ("subsets", "seeds", "measurements"):
        np.testing.assert_array_equal(getattr(loaded, a), getattr(truth, a))
        np.testing.assert_array_equal(getattr(again, a), getattr(truth, a))
    scores = np.random.default_rng(0).standard_normal((2, 12))
    assert lds(scores, loaded).per_measurement[0] == pytest.approx(lds(scores, truth).per_measurement[0])
    with pytest.raises(ValueError, match="other settings"):
        build_ground_truth(train_fn, 12, tmp_path, num_subsets=5, seeds_per_subset=2)
    with pytest.raises(ValueError, match="training examples"):
        lds(np.zeros((2, 11)), truth)


def test_subsets_are_half_size_distinct_and_seeded():
    """make_subsets draws round(fraction·N) distinct sorted indices per subset, reproducibly."""
    a = make_subsets(11, 6, 0.5, seed=3)
    assert a.shape == (6, 6) and all(len(set(r)) == 6 for r in a) and (np.diff(a, axis=1) > 0).all()
    np.testing.assert_array_equal(a, make_subsets(11, 6, 0.5, seed=3))
    assert not np.array_equal(a, make_subsets(11, 6, 0.5, seed=4))
    with pytest.raises(ValueError):
        make_subsets(4, 3, fraction=0.1)
