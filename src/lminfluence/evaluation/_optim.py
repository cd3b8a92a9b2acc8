"""Adam on the PBRF objective, one learning rate and restart per run, until the gradient norm is small."""

from __future__ import annotations

import math
from typing import Any

import torch

Params = dict[str, torch.Tensor]
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-12  # relative to each run's initial gradient norm
GRADIENT_PATIENCE = 3  # a run also halves when ‖∇J‖ has no new low for this many × patience steps


def _norm(tree: Params) -> torch.Tensor:
    """Joint norm over all parameters per run, [K]."""
    return torch.sqrt(sum(t.reshape(t.shape[0], -1).double().square().sum(1) for t in tree.values()))  # type: ignore[arg-type]


def _where(mask: torch.Tensor, a: Params, b: Params) -> Params:
    """Per run (the leading axis), a where ``mask`` [K] else b."""
    return {k: torch.where(mask.reshape((-1,) + (1,) * (a[k].dim() - 1)), a[k], b[k]) for k in a}


class _Adam:
    """Adam with one learning rate, step count and restart per run (the leading axis K)."""

    def __init__(self, like: Params, eps: torch.Tensor) -> None:
        self.m = {k: torch.zeros_like(t) for k, t in like.items()}
        self.v = {k: torch.zeros_like(t) for k, t in like.items()}
        self.age = torch.zeros_like(eps)  # steps since the moments were last reset, [K]
        self.eps = eps

    def reset(self, runs: torch.Tensor) -> None:
        """Forget the moments of the runs marked in ``runs`` [K] (bool)."""
        keep = (~runs).to(self.eps)
        self.age = self.age * keep
        for k in self.m:
            shape = (-1,) + (1,) * (self.m[k].dim() - 1)
            self.m[k] = self.m[k] * keep.reshape(shape)
            self.v[k] = self.v[k] * keep.reshape(shape)

    def step(self, delta: Params, grads: Params, lr: torch.Tensor) -> Params:
        b1, b2 = ADAM_BETAS
        self.age = self.age + 1
        c1, c2 = 1 - b1**self.age, 1 - b2**self.age
        out = {}
        for k, g in grads.items():
            shape = (-1,) + (1,) * (g.dim() - 1)
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / c1.reshape(shape)
            denom = (self.v[k] / c2.reshape(shape)).sqrt() + self.eps.reshape(shape)
            out[k] = delta[k] - lr.reshape(shape) * m_hat / denom
        return out


def solve(obj: Any, z, signs, loss_zs, cfg: Any) -> tuple[Params, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on δ for every run until ‖∇J‖ ≤ tol ‖∇J(0)‖: (δ, converged [K], steps [K], rel_grad [K]).

    ``obj`` gives θ_s (``theta``), λ per parameter (``lam``) and ``value_and_grad``; ``cfg`` is a PBRFConfig.

    A run whose objective has not reached a new low for ``patience`` steps, or its gradient norm
    for 3 × ``patience`` steps, halves its learning rate, goes back to its best point so far (when
    it has left it) and restarts Adam's moments (their memory of the early, large gradients would otherwise shrink
    every later step): a learning rate far too large costs a few halvings, not a divergence. The
    objective is tracked by the trapezoid rule on the gradients, J(δ') - J(δ) ≈ ½(g + g')·(δ' - δ),
    exact on quadratics and free of the cancellation that makes J itself imprecise for small ε.
    """
    K = signs.shape[0]
    delta = {k: torch.zeros((K,) + t.shape, dtype=t.dtype, device=t.device) for k, t in obj.theta.items()}
    grads = obj.value_and_grad(delta, z, signs, loss_zs)[1]
    g0 = _norm(grads)
    # a point whose loss has zero gradient does not move: converged at δ = 0
    rel = torch.where(g0 > 0, torch.ones_like(g0), torch.zeros_like(g0))
    g0 = torch.where(g0 > 0, g0, torch.ones_like(g0))
    if cfg.lr is not None:
        lr = torch.full_like(g0, cfg.lr)
    else:  # 0.1 × RMS of the proximal-only solution ∇L/λ, an overestimate the halving corrects
        size = sum(t.numel() for t in obj.theta.values())
        rms = _norm({k: grads[k] / obj.lam[k] for k in grads}) / math.sqrt(size)
        lr = 0.1 * rms.clamp_min(torch.finfo(torch.float64).tiny)
    adam = _Adam(delta, (ADAM_EPS * g0).to(signs))
    active = rel > cfg.tol
    steps = torch.zeros(K, dtype=torch.long, device=signs.device)
    progress = torch.zeros_like(g0)  # J(δ) - J(0)
    best = torch.zeros_like(g0)
    stall = torch.zeros_like(steps)
    g_stall = torch.zeros_like(steps)
    g_best = g0.clone()
    best_delta, best_grads = dict(delta), dict(grads)  # the point of the lowest objective, per run
    for _ in range(cfg.max_steps):
        if not active.any():
            break
        new = adam.step(delta, grads, (lr * active).to(signs))  # finished runs keep their δ
        new_grads = obj.value_and_grad(new, z, signs, loss_zs)[1]
        progress = progress + 0.5 * sum(
            ((grads[k] + new_grads[k]) * (new[k] - delta[k])).reshape(K, -1).double().sum(1) for k in grads
        )
        delta, grads = new, new_grads
        steps = steps + active.long()
        rel = torch.where(active, _norm(grads) / g0, rel)
        active = active & (rel > cfg.tol)
        improved = progress < best
        best = torch.where(improved, progress, best)
        stall = torch.where(improved, torch.zeros_like(stall), stall + 1)
        best_delta, best_grads = _where(improved, delta, best_delta), _where(improved, grads, best_grads)
        gnorm = _norm(grads)
        g_improved = gnorm < g_best
        g_best = torch.where(g_improved, gnorm, g_best)
        g_stall = torch.where(g_improved, torch.zeros_like(g_stall), g_stall + 1)
        halve = active & ((stall >= cfg.patience) | (g_stall >= GRADIENT_PATIENCE * cfg.patience))
        if halve.any():
            lr = torch.where(halve, lr / 2, lr)
            stall = torch.where(halve, torch.zeros_like(stall), stall)
            g_stall = torch.where(halve, torch.zeros_like(g_stall), g_stall)
            adam.reset(halve)
            back = halve & (progress > best)  # the objective went up since its best point: return there
            delta, grads = _where(back, best_delta, delta), _where(back, best_grads, grads)
            progress = torch.where(back, best, progress)
            gnorm = _norm(grads)
            rel = torch.where(halve, gnorm / g0, rel)
            g_best = torch.where(halve, gnorm, g_best)
    # a run that stopped above its best objective returns that best point, not its last iterate
    back = progress > best
    if back.any():
        delta, grads = _where(back, best_delta, delta), _where(back, best_grads, grads)
        rel = torch.where(back, _norm(grads) / g0, rel)
    return delta, rel <= cfg.tol, steps.cpu(), rel.cpu()


__all__ = ["solve"]
