"""The study's pieces that do not depend on the task: setups, estimators, correlations, caching.

A ``Setup`` is one trained model with its task, training set, 10 test
queries, the tracked modules, which training points are compared with the
PBRF, and (for LDS) a function that retrains the model on a subset.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import lminfluence as li
from lminfluence import Task

logger = logging.getLogger("accuracy")

METHODS = ("identity", "diagonal", "kfac", "ekfac", "lissa")
DRAWS = 16  # label draws per training example of the "_d16" variants
CG_STEPS = (5, 10, 20)  # conjugate-gradient steps of the "ekfac_cg<k>" variants
LABELS = {
    "identity": "gradient dot product",
    "diagonal": "diagonal",
    "kfac": "K-FAC",
    "ekfac": "EK-FAC",
    "lissa": "LiSSA",
    f"kfac_d{DRAWS}": f"K-FAC, {DRAWS} label draws",
    f"ekfac_d{DRAWS}": f"EK-FAC, {DRAWS} label draws",
    **{f"ekfac_cg{k}": f"EK-FAC + CG, k = {k}" for k in CG_STEPS},
    **{f"ekfac_d{DRAWS}_cg{k}": f"EK-FAC, {DRAWS} draws, + CG, k = {k}" for k in CG_STEPS},
    "exact": "exact damped GN (CG)",
    "pbrf": "PBRF",
}


def split_method(method: str) -> tuple[str, int, int | None]:
    """("ekfac_d16_cg5" -> ("ekfac", 16, 5)): the strategy, label draws per training example, CG steps (None: no refinement)."""
    strategy, *parts = method.split("_")
    draws, steps = 1, None
    for part in parts:
        if part.startswith("cg") and part[2:].isdigit():
            steps = int(part[2:])
        elif part.startswith("d") and part[1:].isdigit():
            draws = int(part[1:])
        else:
            raise ValueError(f"unknown method {method!r}: expected <strategy>[_d<draws>][_cg<steps>]")
    return strategy, draws, steps


@dataclass
class Setup:
    """One task of the study, trained and ready to be scored."""

    name: str
    model: nn.Module
    task: Task
    train: list[dict[str, torch.Tensor]]
    queries: list[dict[str, torch.Tensor]]
    modules: tuple[str, ...]
    scored: np.ndarray  # indices into ``train`` compared with the PBRF
    info: dict[str, Any] = field(default_factory=dict)
    retrain: Callable[[np.ndarray, int], nn.Module] | None = None  # (subset indices, seed) -> model
    batch_size: int = 64  # sequences per pass when fitting and scoring
    lissa: dict[str, Any] = field(default_factory=dict)  # FactorConfig lissa_* settings

    def measure(self, model: nn.Module) -> torch.Tensor:
        """f of every query under ``model``, [Q]."""
        with torch.no_grad():
            batch = self.task.collate(self.queries)
            return self.task.measurement(self.task.forward(model, batch), batch).double()


# ----------------------------------------------------------------- caching


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    tmp.replace(path)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def save_tensors(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)


def load_tensors(path: Path) -> dict[str, Any] | None:
    return torch.load(path, weights_only=False) if path.exists() else None


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# ---------------------------------------------------------------- damping


def mean_gn_eigenvalue(setup: Setup, seed: int = 0) -> float:
    """trace(G) / P over all tracked parameters: the mean of the diagonal Fisher's entries.

    With sampled labels this is an unbiased estimate of the Gauss–Newton
    Hessian's mean eigenvalue (exact for the regression task, whose
    pseudo-gradient has no noise).
    """
    factors = li.fit_factors(
        setup.model, setup.train, li.FactorConfig(strategy="diagonal", modules=setup.modules, seed=seed),
        task=setup.task, execution=li.Execution(batch_size=setup.batch_size),
    )
    st = factors.curvature.state
    total = sum(float(st[n]["lambda"].sum()) for n in factors.layers)
    count = sum(st[n]["lambda"].numel() for n in factors.layers)
    return total / count


# -------------------------------------------------------------- estimators


def run_estimator(setup: Setup, method: str, damping: float, seed: int = 0) -> dict[str, Any]:
    """Fit ``method`` and score every training point for the 10 queries, timed.

    Returns the scores [Q, N] (raw, docs/method.md §1: positive = raises f) and
    the seconds spent fitting and scoring. The damping is absolute (the
    PBRF's λ), the same for every layer. ``method`` is a strategy, with
    ``_d<K>`` to fit on K label draws per training example and ``_cg<k>`` to
    refine the queries by k conjugate-gradient steps on exact Gauss–Newton
    products over the whole training set (``ScoreConfig(refine="cg")``).
    """
    strategy, draws, steps = split_method(method)
    extra = setup.lissa if strategy == "lissa" else {}
    config = li.FactorConfig(strategy=strategy, modules=setup.modules, seed=seed, **extra)
    # draws > 1: each example appears ``draws`` times in the fitting data, each copy with its own
    # sampled labels: a Monte Carlo estimate of the Fisher's expectation over labels with less noise
    fit_data = setup.train if draws == 1 else list(setup.train) * draws
    start = time.perf_counter()
    factors = li.fit_factors(setup.model, fit_data, config, task=setup.task, execution=li.Execution(batch_size=setup.batch_size))
    fitted = time.perf_counter()
    score_cfg = li.ScoreConfig(damping=damping) if steps is None else li.ScoreConfig(damping=damping, refine="cg", refine_steps=steps)
    score_exec = li.Execution(batch_size=setup.batch_size, query_batch_size=len(setup.queries))
    scores = li.compute_scores(setup.model, factors, setup.queries, setup.train, score_cfg, task=setup.task, execution=score_exec)
    done = time.perf_counter()
    meta = {k: v for k, v in scores.meta.items() if k in ("strategy", "lissa", "refine")}
    return {
        "scores": scores.total.double().cpu(),
        "fit_s": fitted - start,
        "score_s": done - fitted,
        "meta": meta,
    }


# ------------------------------------------------------------ correlations


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).statistic)


def per_query_pearson(estimate: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """Pearson correlation over training points, one per query: estimate, truth [Q, n]."""
    return [pearson(estimate[q], truth[q]) for q in range(truth.shape[0])]


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


__all__ = [
    "Setup",
    "METHODS",
    "LABELS",
    "DRAWS",
    "CG_STEPS",
    "split_method",
    "run_estimator",
    "mean_gn_eigenvalue",
    "pearson",
    "spearman",
    "per_query_pearson",
    "mean_std",
    "save_json",
    "load_json",
    "save_tensors",
    "load_tensors",
]
