"""A diagnostic reference: the exact damped Gauss–Newton influence, by conjugate gradients.

    I(z) = -∇fᵀ (G + λI)⁻¹ ∇L(z)

with G the full Gauss–Newton Hessian of the mean training loss over the
tracked layers (all blocks coupled, no Kronecker or diagonal approximation).
To first order in ε this is what the PBRF measures (docs/method.md §8), so it
tells the two possible sources of a disagreement apart: an estimator far from
this reference is a poor approximation of G; a PBRF far from it is not
converged (or ε is too large for the first-order regime).

One conjugate-gradient solve per query (the library's ``conjugate_gradients``,
unpreconditioned and started from zero), on full-batch Gauss–Newton-vector
products (the library's ``DampedGaussNewton``, the same products LiSSA and
the refinement use); the solved queries are then scored against every
training point by the library's own scoring path.
"""

from __future__ import annotations

import time

import torch

import lminfluence as li
from lminfluence.curvature.cg import DampedGaussNewton, conjugate_gradients, dot
from lminfluence.curvature.gnvp import GaussNewtonProduct
from lminfluence.curvature.math import sequence_gradients
from lminfluence.passes import run_pass, tracking
from lminfluence.scoring.contract import LayerQueries
from lminfluence.scoring.pairwise import score_preconditioned

from .study import Setup

Vec = dict[str, torch.Tensor]  # layer name -> [Q, O, I]


def exact_influence(setup: Setup, damping: float, max_iter: int = 500, tol: float = 1e-8, block_diagonal: bool = False) -> dict:
    """Exact damped-GN scores [Q, N] of every training point, with the solve's diagnostics.

    ``block_diagonal`` keeps only G's diagonal blocks (one per tracked layer, each exact):
    the structure K-FAC and EK-FAC assume, so the gap between the two references is
    what ignoring the coupling between layers costs.
    """
    start = time.perf_counter()
    model, task = setup.model, setup.task
    factors = li.fit_factors(model, setup.train, li.FactorConfig(strategy="identity", modules=setup.modules), task=task)
    modules = {n: m for n, m in model.named_modules() if n in factors.layers}
    with tracking(model, modules) as col:  # ∇g = -∇f per query, as W̄ [Q, O, I]
        caps = next(run_pass(model, task, col, setup.queries, len(setup.queries), "measurement")).captures
        grads = {n: sequence_gradients(c.a, c.ds).double() for n, c in caps.items()}
    blocks = [{n: i} for n, i in factors.layers.items()] if block_diagonal else [dict(factors.layers)]
    solved: Vec = {}
    iters, residual = 0, 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for layers in blocks:  # every training point in one chunk: full-batch products
                apply = DampedGaussNewton(model, task, layers, setup.train, len(setup.train), {n: damping for n in layers})
                res = conjugate_gradients(apply, {n: grads[n] for n in layers}, max_iter, tol=tol)
                solved.update(res.x)
                iters, residual = max(iters, res.steps_run), max(residual, float(res.residuals[-1].max()))
    finally:
        model.train(was_training)
    pq = {n: LayerQueries(dense=solved[n].to(grads[n].dtype)) for n in solved}
    cfg = li.ScoreConfig(damping=damping)
    scores = score_preconditioned(model, factors, pq, setup.train, cfg, task=task, execution=li.Execution(batch_size=setup.batch_size))
    return {
        "scores": scores.total.double(),
        "iterations": iters,
        "residual": residual,
        "seconds": time.perf_counter() - start,
    }


def max_eigenvalue(setup: Setup, iters: int = 30) -> float:
    """The largest eigenvalue of the full-batch G over the tracked layers, by power iteration."""
    model, task = setup.model, setup.task
    factors = li.fit_factors(model, setup.train, li.FactorConfig(strategy="identity", modules=setup.modules), task=task)
    gnvp = GaussNewtonProduct(model, task, factors.layers)
    batch = task.collate(setup.train)
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(1, i.out_dim, i.in_dim, generator=g, dtype=torch.float64) for n, i in factors.layers.items()}
    value = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(iters):
                norm = float(dot(x, x).sqrt())
                x = {n: t / norm for n, t in x.items()}
                gx = gnvp(batch, len(setup.train), x)
                value = float(dot(x, gx))
                x = gx
    finally:
        model.train(was_training)
    return value


__all__ = ["exact_influence", "max_eigenvalue"]
