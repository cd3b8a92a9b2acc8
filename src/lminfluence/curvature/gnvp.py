"""Exact Gauss–Newton-vector products G̃ v through the model, with no matrix formed.

G̃ v = (1/B) Σ_b J_bᵀ H_b J_b v on one mini-batch of B training sequences is
built from three products: J_b v forward-mode (``torch.func.jvp``) through the
model with respect to the tracked layers' W̄ = [W | b]; H_b u, the Hessian of
the task's per-sequence loss with respect to the model outputs (softmax
cross-entropy: diag(p) − ppᵀ per loss-carrying position; squared error: the
identity), as a reverse-over-reverse product; and J_bᵀ u reverse-mode
(``torch.func.vjp``). G is on the library's scale (docs/method.md §1): the mean
over sequences of each sequence's summed-loss Gauss–Newton matrix, and it
keeps the blocks that couple layers.

LiSSA's recursion, the conjugate-gradient refinement and the benchmarks'
exact references use these products; PBRF uses ``TaskModule``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..hooks.modules import LayerInfo

PREFIX = "model."  # TaskModule's parameters are the model's, under this prefix


class TaskModule(nn.Module):
    """The task's forward as a module, so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, task: Any) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.forward(self.model, batch)


class GaussNewtonProduct:
    """v ↦ G̃ v on one mini-batch, for Q stacked W̄-shaped vectors [Q, O, I] per tracked layer at once."""

    def __init__(self, model: nn.Module, task: Any, layers: dict[str, LayerInfo]) -> None:
        self.module = TaskModule(model, task)
        self.task = task
        self.layers = layers
        named = dict(self.module.named_parameters())
        self.params = {}
        for n, info in layers.items():
            for key in info.to_params(n, torch.zeros(info.out_dim, info.in_dim), PREFIX):
                self.params[key] = named[key].detach()

    def __call__(self, batch: dict[str, torch.Tensor], size: int, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G̃ v for v [Q, O, I] per layer; ``size`` = B, the sequences in ``batch``."""

        def outputs(p):
            return functional_call(self.module, p, (batch,))

        def loss(h):
            return self.task.loss(h, batch).sum()

        tangents: dict[str, torch.Tensor] = {}
        for n, info in self.layers.items():
            for key, t in info.to_params(n, v[n], PREFIX).items():
                tangents[key] = t.to(self.params[key].dtype)
        # fused attention kernels have no forward-mode derivative; the math kernel is the same function
        with sdpa_kernel([SDPBackend.MATH]):
            out, pull = vjp(outputs, self.params)[:2]
            jv = vmap(lambda t: jvp(outputs, (self.params,), (t,))[1])(tangents)  # [Q, *out]: J v
        hessian = vjp(grad(loss), out)[1]  # H_out is symmetric: its vjp is H_out u (reverse-over-reverse)
        (hjv,) = vmap(hessian)(jv)  # [Q, *out]: H_out J v
        (back,) = vmap(pull)(hjv)  # Jᵀ H_out J v, per parameter [Q, ...]
        return {n: info.from_params(n, back, PREFIX).to(v[n].dtype) / size for n, info in self.layers.items()}


__all__ = ["TaskModule", "GaussNewtonProduct", "PREFIX"]
