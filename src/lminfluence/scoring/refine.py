"""Refining the fitted curvature's solution by conjugate gradients (``ScoreConfig(refine="cg")``).

EK-FAC's (G + λI)⁻¹ ∇g is an approximation twice over: G is taken
block-diagonal over the layers, and each block Kronecker-factored. This
module solves the exact system

    (G + λI) x = ∇g          (λ per layer, as for every strategy)

for every query with preconditioned conjugate gradients (``curvature/cg.py``):
G is the exact Gauss–Newton Hessian over all tracked layers jointly, applied
by forward- and reverse-mode products through the model
(``curvature/gnvp.py``) over the training data given to ``compute_scores``
(its ``curvature_data``, else ``train``) or to the two-stage procedure, or
over a seeded subsample of it (``refine_sample``); the preconditioner is the
fitted curvature's layerwise inverse, and the start x_0 its solution, so 0
steps return EK-FAC's queries unchanged and k steps move them towards the
exact damped Gauss–Newton influence.

The queries' gradients are kept during the queries' pass, as LiSSA keeps
them, and solved once the pass is done, one query batch
(``Execution.query_batch_size``) at a time with one step size per query;
with ``query_rank`` the refined P is then factorised to rank R.

Cost: k steps make k + 1 passes over the refinement data (one forms the
start's residual), each with Q forward-mode and Q reverse-mode products per
sequence, so roughly (k + 1) · Q · N_refine / N times the cost of one scoring
pass over N sequences. The scores' metadata records the relative residual
‖∇g − (G + λI) x‖ / ‖∇g‖ of every query at the start (EK-FAC's solution) and
after each step.

Usage::

    import lminfluence as li

    factors = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac"))
    cfg = li.ScoreConfig(refine="cg", refine_steps=10)
    scores = li.compute_scores(model, factors, queries, train, cfg)
    scores.meta["refine"]["residual"]      # per query, after the last step
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..config import ScoreConfig
from ..curvature.cg import CGResult, DampedGaussNewton, conjugate_gradients
from ..curvature.factors import Factors
from ..curvature.math import low_rank, sequence_gradients
from ..errors import InputError
from ..hooks.collector import LayerCapture
from ..passes import eval_mode
from ..progress import progress
from .contract import LayerQueries

logger = logging.getLogger(__name__)

STOP_EPS = 10.0  # a query stops once its relative residual is below this many machine epsilons of its dtype
SAMPLE_SEED_OFFSET = 7919  # the refinement's subsample is drawn with FactorConfig.seed + this (not the labels' stream)


def refinement_data(data: Any, sample: int | None, seed: int) -> Any:
    """``data`` as an indexable sequence, or ``sample`` of its examples drawn without replacement (in index order)."""
    if data is None:
        raise InputError("refine='cg' forms Gauss–Newton products over training data: pass train (or curvature_data)")
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        data = list(data)
    if len(data) == 0:
        raise InputError("refine='cg' needs a non-empty training set")
    if sample is None or sample >= len(data):
        return data
    g = torch.Generator().manual_seed(seed + SAMPLE_SEED_OFFSET)
    keep = sorted(torch.randperm(len(data), generator=g)[:sample].tolist())
    return [data[i] for i in keep]


class CGPreconditioner:
    """Conjugate-gradient refinement of a layerwise curvature's solution, all tracked layers jointly.

    Args:
        model: the model the factors were fitted on.
        factors: the fitted curvature (``ekfac``, ``kfac`` or ``diagonal``): preconditioner and start.
        dampings: λ of every tracked layer.
        rank: factorise the refined P to this rank (None: dense).
        task: the task whose loss defines G.
        data: the training examples the products are formed over.
        config: the ScoreConfig (``refine_steps``, ``refine_sample``).
        batch_size: sequences per chunk of a product.
    """

    def __init__(
        self, model: nn.Module, factors: Factors, dampings: dict[str, float], rank: int | None, task: Any, data: Any,
        config: ScoreConfig, batch_size: int,
    ) -> None:  # fmt: skip
        if factors.strategy in ("lissa", "identity"):
            why = "LiSSA already solves with exact products" if factors.strategy == "lissa" else "the identity has no damping"
            raise InputError(f"refine='cg' refines a fitted curvature's solution; {why}: fit strategy='ekfac' (or kfac, diagonal)")
        if not min(dampings.values()) > 0:
            raise InputError("refine='cg' needs a positive damping λ on every layer: set ScoreConfig.damping > 0 or damping_scale > 0")
        self.model, self.factors, self.dampings, self.rank, self.task = model, factors, dampings, rank, task
        self.steps, self.sample = config.refine_steps, config.refine_sample
        self.data = refinement_data(data, config.refine_sample, factors.config.seed)
        self.batch_size = batch_size
        self.grads: list[dict[str, torch.Tensor]] = []
        self.results: list[CGResult] = []

    def add(self, captures: dict[str, LayerCapture]) -> None:
        self.grads.append({n: sequence_gradients(cap.a, cap.ds) for n, cap in captures.items()})  # [B, O, I]

    def precondition(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """M v: the fitted curvature's (G_l + λ_l I)⁻¹ per layer."""
        curvature = self.factors.curvature
        return {n: curvature.precondition(n, t, self.dampings[n]) for n, t in v.items()}

    def solve(self, grads: dict[str, torch.Tensor]) -> CGResult:
        """The refined (G + λI)⁻¹ ∇g of one batch of queries, [Q, O, I] per layer."""
        missing = sorted(set(self.factors.layers) - set(grads))
        if missing:
            raise ValueError(f"refinement solves all tracked layers at once; no gradient for {', '.join(missing)}")
        b = {n: grads[n] for n in self.factors.layers}
        with eval_mode(self.model), torch.no_grad():
            operator = DampedGaussNewton(self.model, self.task, self.factors.layers, self.data, self.batch_size, self.dampings)
            with progress(self.steps + 1, "refine (cg)", "product") as bar:

                def apply(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                    out = operator(v)
                    bar.update(1)
                    return out

                # below a few rounding errors of the working dtype a step changes nothing: that query stops
                tol = STOP_EPS * torch.finfo(next(iter(b.values())).dtype).eps
                return conjugate_gradients(apply, b, self.steps, precondition=self.precondition, x0=self.precondition(b), tol=tol)

    def result(self) -> dict[str, LayerQueries]:
        parts: dict[str, list[LayerQueries]] = {n: [] for n in self.dampings}
        for grads in self.grads:
            res = self.solve(grads)
            self.results.append(res)
            for name, p in res.x.items():
                if self.rank is None or self.rank >= min(p.shape[-2:]):
                    parts[name].append(LayerQueries(dense=p))
                else:
                    u, s, w = low_rank(p, self.rank)
                    parts[name].append(LayerQueries(u=u, s=s, v=w))
        self.grads = []
        logger.info("refine (cg): %d steps, relative residual %s", self.steps, self._summary())
        return {n: LayerQueries.concat(ps) for n, ps in parts.items()}

    def _summary(self) -> str:
        if not self.results:
            return "–"
        start = torch.cat([r.residuals[0] for r in self.results])
        end = torch.cat([r.residuals[-1] for r in self.results])
        return f"{float(start.median()):.2e} → {float(end.median()):.2e} (median over queries)"

    def describe(self) -> dict[str, Any]:
        """Settings and the residuals: ``residual_start`` (EK-FAC's), ``residual`` (final), ``residual_by_step`` per query."""
        if not self.results:
            return {}
        by_step = [r.residuals.T.tolist() for r in self.results]  # per batch: [Q_batch][steps + 1]
        per_query = [row for rows in by_step for row in rows]
        return {
            "refine": {
                "method": "cg",
                "steps": self.steps,
                "sample": len(self.data),
                "products": sum(r.products for r in self.results),
                "residual_start": [row[0] for row in per_query],
                "residual": [row[-1] for row in per_query],
                "residual_by_step": per_query,
            }
        }


__all__ = ["CGPreconditioner", "refinement_data", "SAMPLE_SEED_OFFSET"]
