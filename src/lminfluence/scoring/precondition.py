"""Preconditioning the queries: P = (G + λI)⁻¹ ∇g per tracked layer (Eq 21), dense or rank-R (§3.2.2).

A preconditioner receives each batch of query captures during the queries'
pass (``add``) and hands back every layer's ``LayerQueries`` after it
(``result``). Two implementations:

- ``LayerwisePreconditioner``: a curvature that is block-diagonal over the
  layers (EK-FAC, K-FAC, diagonal, identity) preconditions each batch as it
  comes, without forming the dense gradient when a rank-R factorisation is asked for;
- ``LissaPreconditioner``: LiSSA couples the layers and runs the model
  itself, so it keeps the dense query gradients and solves once the queries'
  pass (and its hooks) are done.

``refine.CGPreconditioner`` (``ScoreConfig(refine="cg")``) refines a layerwise
curvature's solution by conjugate gradients, solving after the pass as LiSSA does.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..config import ScoreConfig
from ..curvature.base import Curvature
from ..curvature.factors import Factors
from ..curvature.lissa import LissaSolver
from ..curvature.math import factorize, sequence_gradients
from ..hooks.collector import LayerCapture
from .contract import LayerQueries


class QueryPreconditioner(Protocol):
    """Turns the queries' captures into preconditioned gradients, one batch of queries at a time."""

    def add(self, captures: dict[str, LayerCapture]) -> None:
        """Take one batch of query captures (ā [B, T, I], ds [B, T, O] per layer; ds of g = -f); it may empty the dict."""

    def result(self) -> dict[str, LayerQueries]:
        """Every layer's preconditioned gradients of all queries added, in order."""

    def describe(self) -> dict[str, Any]:
        """Settings and diagnostics for the scores' metadata."""


def _factorised(p: torch.Tensor, rank: int | None) -> LayerQueries:
    """A dense P [Q, O, I] as LayerQueries, rank-R factors when that is smaller than P."""
    if rank is None or rank >= min(p.shape[-2:]):
        return LayerQueries(dense=p)
    u, s, w = factorize(p, rank)
    return LayerQueries(u=u, s=s, v=w)


class LayerwisePreconditioner:
    """(G_l + λ_l I)⁻¹ per layer, for curvatures that are block-diagonal over the layers."""

    def __init__(self, curvature: Curvature, dampings: dict[str, float], rank: int | None) -> None:
        self.curvature, self.dampings, self.rank = curvature, dampings, rank
        self.parts: dict[str, list[LayerQueries]] = {n: [] for n in dampings}

    def add(self, captures: dict[str, LayerCapture]) -> None:
        # each layer's captures are taken out of the dict once used, so that they are freed while the
        # preconditioned gradients grow (a batch's captures of every layer weigh as much as a few layers' P)
        for name in list(captures):
            cap = captures.pop(name)
            self.parts[name].append(LayerQueries.precondition(self.curvature, name, cap.a, cap.ds, self.dampings[name], self.rank))

    def result(self) -> dict[str, LayerQueries]:
        # one layer at a time, its parts released as they are joined: never two copies of every layer
        return {n: LayerQueries.concat(self.parts.pop(n)) for n in list(self.parts)}

    def describe(self) -> dict[str, Any]:
        return {}


class LissaPreconditioner:
    """LiSSA over all tracked layers jointly: gradients are kept during the pass, solved after it."""

    def __init__(self, solver: LissaSolver, dampings: dict[str, float], rank: int | None) -> None:
        self.solver, self.dampings, self.rank = solver, dampings, rank
        self.grads: list[dict[str, torch.Tensor]] = []

    def add(self, captures: dict[str, LayerCapture]) -> None:
        self.grads.append({n: sequence_gradients(cap.a, cap.ds) for n, cap in captures.items()})  # [B, O, I]

    def result(self) -> dict[str, LayerQueries]:
        parts: dict[str, list[LayerQueries]] = {n: [] for n in self.dampings}
        for grads in self.grads:
            for name, p in self.solver.solve(grads, self.dampings).items():  # [B, O, I]
                parts[name].append(_factorised(p, self.rank))
        return {n: LayerQueries.concat(ps) for n, ps in parts.items()}

    def describe(self) -> dict[str, Any]:
        return {"lissa": dict(self.solver.report)} if self.solver.report else {}


def make_preconditioner(
    model: nn.Module, factors: Factors, dampings: dict[str, float], rank: int | None, task: Any, curvature_data: Any,
    config: ScoreConfig | None = None, batch_size: int = 8,
) -> QueryPreconditioner:
    """The preconditioner of ``factors``' strategy, or its conjugate-gradient refinement (``config.refine``).

    LiSSA draws its products' mini-batches from ``curvature_data``; the refinement forms its products over
    all of it (or ``config.refine_sample`` of it), ``batch_size`` sequences at a time.
    """
    if config is not None and config.refine == "cg":
        from .refine import CGPreconditioner

        return CGPreconditioner(model, factors, dampings, rank, task, curvature_data, config, batch_size)
    if factors.strategy == "lissa":
        solver = LissaSolver(model, task, curvature_data, factors.layers, factors.config)
        return LissaPreconditioner(solver, dampings, rank)
    return LayerwisePreconditioner(factors.curvature, dampings, rank)


__all__ = ["QueryPreconditioner", "LayerwisePreconditioner", "LissaPreconditioner", "make_preconditioner"]
