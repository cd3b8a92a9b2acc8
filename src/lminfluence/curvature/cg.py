"""Preconditioned conjugate gradients for (G + λI) x = b, Q right-hand sides at once.

The maths apart from the plumbing: ``conjugate_gradients`` is the textbook
preconditioned CG on vectors that are dicts of per-layer [Q, O, I] tensors,
with one step size per query (each query's iteration is the one it would run
alone); ``DampedGaussNewton`` is the operator v ↦ (G + λ)v with G the exact
Gauss–Newton Hessian of the mean training loss over a dataset (all tracked
layers jointly, ``gnvp.py``) and λ per layer.

One step, for each query q (M the preconditioner, A the operator)::

    α_q = ⟨r, z⟩_q / ⟨p, A p⟩_q,   x += α p,   r -= α A p,
    z = M r,   β_q = ⟨r, z⟩_q(new) / ⟨r, z⟩_q(old),   p = z + β p

started from x_0 (r_0 = b − A x_0, z_0 = M r_0, p_0 = z_0). A query whose
relative residual ‖r‖/‖b‖ is at most ``tol`` stops moving (α = 0); the
others continue. Dot products are summed in float64; the vectors keep the
dtype of b.

In exact arithmetic the error after k steps shrinks at least like
2((√κ − 1)/(√κ + 1))^k with κ the condition number of M A: a preconditioner
close to A⁻¹ (EK-FAC) makes κ small, and the start x_0 = M b (EK-FAC's
solution) makes the first error small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RefinementError
from ..hooks.modules import LayerInfo
from ..passes import collate_to, model_device
from .gnvp import GaussNewtonProduct

Vec = dict[str, torch.Tensor]  # layer name → [Q, O, I]
PIECE_ELEMENTS = 1 << 22  # Q × model-output elements of one piece of a product (16 MiB in float32)
Operator = Callable[[Vec], Vec]


def dot(x: Vec, y: Vec) -> torch.Tensor:
    """⟨x_q, y_q⟩ over all layers, per query, in float64, [Q]."""
    return sum((x[n] * y[n]).sum((1, 2), dtype=torch.float64) for n in x)  # type: ignore[return-value]


def _axpy(y: Vec, alpha: torch.Tensor, x: Vec) -> None:
    """In place: y_q += α_q x_q for every query, α [Q]."""
    for n in y:
        y[n].add_(alpha.to(y[n].dtype).view(-1, 1, 1) * x[n])


@dataclass
class CGResult:
    """What ``conjugate_gradients`` found.

    Attributes:
        x: the solution, per layer [Q, O, I].
        residuals: ‖b − A x_k‖ / ‖b‖ per step k = 0 … steps_run (recursively updated), [steps_run + 1, Q].
        steps_run: CG steps taken (fewer than asked when every query met ``tol``).
        products: operator products used (the start's residual included).
    """

    x: Vec
    residuals: torch.Tensor
    steps_run: int
    products: int
    extra: dict[str, Any] = field(default_factory=dict)


def conjugate_gradients(
    apply: Operator,
    b: Vec,
    steps: int,
    *,
    precondition: Operator | None = None,
    x0: Vec | None = None,
    tol: float = 0.0,
) -> CGResult:
    """Solve A x = b for Q right-hand sides (A symmetric positive definite), preconditioned by M ≈ A⁻¹.

    Args:
        apply: v ↦ A v for a batch of Q vectors.
        b: the right-hand sides, per layer [Q, O, I].
        steps: at most this many CG steps (0: x_0 is returned, with its residual).
        precondition: v ↦ M v, symmetric positive definite (None: the identity).
        x0: the start (None: zero, which costs no product).
        tol: a query stops once ‖r‖ / ‖b‖ ≤ tol (0: every query takes every step).

    Raises:
        RefinementError: ⟨p, A p⟩ ≤ 0 or a non-finite value for a query still moving: the operator is
            not positive definite in the working precision.
    """
    m = precondition if precondition is not None else (lambda v: {n: t.clone() for n, t in v.items()})
    b_norm = dot(b, b).sqrt().clamp_min(torch.finfo(torch.float64).tiny)  # [Q]
    products = 0
    if x0 is None:
        x = {n: torch.zeros_like(t) for n, t in b.items()}
        r = {n: t.clone() for n, t in b.items()}
    else:
        x = {n: t.clone() for n, t in x0.items()}
        ax = apply(x)
        products += 1
        r = {n: b[n] - ax[n] for n in b}
    history = [dot(r, r).sqrt() / b_norm]
    z = m(r)
    p = {n: t.clone() for n, t in z.items()}
    rz = dot(r, z)
    taken = 0
    for step in range(steps):
        moving = history[-1] > tol
        if not bool(moving.any()):
            break
        ap = apply(p)
        products += 1
        pap = dot(p, ap)
        bad = moving & ~(torch.isfinite(pap) & (pap > 0) & torch.isfinite(rz))
        if bool(bad.any()):
            q = int(bad.nonzero()[0])
            raise RefinementError(
                f"conjugate gradients, step {step + 1}, query {q}: ⟨p, (G + λI) p⟩ = {float(pap[q]):.3g} is not a positive "
                "finite number, so the damped Gauss–Newton matrix is not positive definite in this precision: "
                "raise the damping (ScoreConfig.damping_scale or damping), or score in float64"
            )
        alpha = torch.where(moving, rz / torch.where(moving, pap, 1.0), 0.0)  # [Q]
        _axpy(x, alpha, p)
        _axpy(r, -alpha, ap)
        del ap
        history.append(torch.where(moving, dot(r, r).sqrt() / b_norm, history[-1]))
        taken = step + 1
        if taken == steps:
            break  # the next direction would not be used
        z = m(r)
        rz_new = dot(r, z)
        beta = torch.where(moving & (rz != 0), rz_new / torch.where(rz != 0, rz, 1.0), 0.0)
        for n in p:
            p[n] = z[n] + beta.to(p[n].dtype).view(-1, 1, 1) * p[n]
        rz = torch.where(moving, rz_new, rz)
    return CGResult(x=x, residuals=torch.stack(history), steps_run=taken, products=products)


class DampedGaussNewton:
    """v ↦ (G + λ_l) v for Q vectors at once, G the exact Gauss–Newton Hessian of the mean loss over ``data``.

    G is on the library's scale (docs/method.md §1: the mean over sequences of
    each sequence's summed-loss Gauss–Newton matrix) and keeps the blocks that
    couple layers. The data is collated in chunks of ``batch_size`` sequences,
    and each chunk is multiplied in pieces (fewer sequences, fewer of the Q
    vectors) whose Q × model-output tensors stay near ``PIECE_ELEMENTS``:
    only time and memory depend on the sizes (on 2 CPU cores a piece of that
    size ran 2-3 times faster than a whole chunk of 32 sequences × 56 queries).
    Each product is one pass over all of the data.

    Args:
        model: the model (in eval mode and under ``torch.no_grad`` while products run).
        task: the task whose loss defines G.
        layers: the tracked layers.
        data: the training examples (indexable), every one of which enters G.
        batch_size: sequences per chunk of a product.
        dampings: λ of every tracked layer.
    """

    def __init__(
        self, model: nn.Module, task: Any, layers: dict[str, LayerInfo], data: Any, batch_size: int, dampings: dict[str, float]
    ) -> None:
        self.model, self.task, self.data, self.batch_size = model, task, data, batch_size
        self.dampings = {n: float(dampings[n]) for n in layers}
        self.gnvp = GaussNewtonProduct(model, task, layers)
        self.device = model_device(model)
        self.products = 0
        self._ratio: float | None = None  # model-output elements per element of the batch's first tensor

    def __call__(self, v: Vec) -> Vec:
        n = len(self.data)
        Q = next(iter(v.values())).shape[0]
        out = {k: lam * v[k] for k, lam in self.dampings.items()}
        for start in range(0, n, self.batch_size):
            batch = collate_to(self.task, [self.data[i] for i in range(start, min(start + self.batch_size, n))], self.device)
            rows, qs = self._pieces(batch, Q)
            for r in rows:
                piece = {key: t[r] for key, t in batch.items()}
                for q in qs:
                    gv = self.gnvp(piece, n, {k: t[q] for k, t in v.items()})  # this piece's share of the mean: (1/N) Σ J_bᵀ H_b J_b v
                    for k in out:
                        out[k][q].add_(gv[k])
        self.products += 1
        return out

    def _pieces(self, batch: dict[str, torch.Tensor], Q: int) -> tuple[list[slice], list[slice]]:
        """Row slices of ``batch`` and slices of the Q vectors whose products hold about PIECE_ELEMENTS output elements."""
        first = next(iter(batch.values()))
        B = first.shape[0]
        if self._ratio is None:  # one forward of one example, once
            self._ratio = self.task.forward(self.model, {key: t[:1] for key, t in batch.items()}).numel() / first[:1].numel()
        per_row = max(1.0, self._ratio * first.numel() / B)  # output elements of one example of this chunk
        rows_per = max(1, min(B, int(PIECE_ELEMENTS // (Q * per_row))))
        q_per = Q if rows_per > 1 or Q * per_row <= PIECE_ELEMENTS else max(1, int(PIECE_ELEMENTS // per_row))
        return [slice(i, min(i + rows_per, B)) for i in range(0, B, rows_per)], [slice(i, min(i + q_per, Q)) for i in range(0, Q, q_per)]


__all__ = ["conjugate_gradients", "CGResult", "DampedGaussNewton", "dot"]
