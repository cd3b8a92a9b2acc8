"""LiSSA (Eq 10): the stochastic Neumann series for (G + λI)⁻¹ v, all tracked layers jointly.

    r_0 = v,   r_j = v + (I - α(G̃_j + λI)) r_{j-1},   (G + λI)⁻¹ v ≈ α r_J

G̃_j v is the exact Gauss–Newton-vector product on the j-th mini-batch of
training sequences (``curvature/gnvp.py``), on the library's scale
(docs/method.md §1). Unlike EK-FAC, LiSSA keeps the blocks that couple layers.

Damping. λ is per layer, as for every strategy: ``ScoreConfig.damping``
(absolute) or ``damping_scale`` × the layer's mean eigenvalue. LiSSA has no
eigenvalues; a layer's mean eigenvalue is trace(G_ll) / D_l, estimated by the
one fitting pass as the mean over sequences of the squared pseudo-gradients
(the diagonal Fisher's mean). For the same data, seed and batch size this is
exactly the mean of EK-FAC's Λ (rotations keep squared norms), so relative
damping gives LiSSA the λ that EK-FAC would use. λ must be positive.

Scale. The recursion converges only while α(μ_max(G̃) + λ) < 2.
``FactorConfig.lissa_scale`` sets α; None takes α = 1 / (μ̂_max + max λ) with
μ̂_max the largest Rayleigh quotient of a short power iteration on mini-batch
products. The error after J steps shrinks like (1 - α(μ_min + λ))^J, so the
depth needed grows with (μ_max + λ) / λ.

Divergence is detected, not returned: when ‖r_j‖ of a query becomes
non-finite or exceeds 10 · ‖v‖ · max(1, 1/(αλ_min)) (the converged ‖r‖ is at
most ‖v‖/(αλ_min)), ``LissaDivergenceError`` is raised.

Fitting (``strategy="lissa"``) only estimates each layer's damping unit; the
recursion itself runs when queries are preconditioned, from the model, the
task and the training data: ``compute_scores`` uses its ``train`` (or the
``curvature_data`` given), the two-stage procedure the whole corpus. The
factors on disk therefore hold no data, and reloaded factors score exactly
as fresh ones. Self-influence is not available (one recursion per training
sequence).

Usage::

    import lminfluence as li

    cfg = li.FactorConfig(strategy="lissa", modules=["*"], lissa_depth=500, lissa_batch_size=32)
    factors = li.fit_factors(model, train, cfg, task=task)
    scores = li.compute_scores(model, factors, queries, train, li.ScoreConfig(damping=1e-3), task=task)
    scores.meta["lissa"]              # α used, μ̂_max, last relative update
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..config import FactorConfig
from ..errors import InputError, LissaDivergenceError
from ..hooks.collector import LayerCapture
from ..hooks.modules import LayerInfo
from ..passes import collate_to, eval_mode, model_device
from ..progress import progress
from . import math as cm
from .base import CORRECTION, Curvature
from .gnvp import GaussNewtonProduct

logger = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 10.0  # ‖r_j‖ beyond this many times the converged bound ‖v‖·max(1, 1/(αλ)) is divergence
POWER_STEPS = 20  # power-iteration steps estimating μ_max for the automatic scale
POWER_WARMUP = 3  # Rayleigh quotients before this step are not used


class _Batches:
    """Mini-batches drawn without replacement, reshuffled each epoch (the whole set when it fits one)."""

    def __init__(self, data: Any, batch_size: int, task: Any, device: torch.device, seed: int) -> None:
        self.data, self.task, self.device = data, task, device
        self.n = len(data)
        self.size = min(batch_size, self.n)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self._full: dict[str, torch.Tensor] | None = None

    def _collate(self, indices) -> dict[str, torch.Tensor]:
        return collate_to(self.task, [self.data[int(i)] for i in indices], self.device)

    def next(self) -> dict[str, torch.Tensor]:
        if self.size == self.n:
            if self._full is None:
                self._full = self._collate(range(self.n))
            return self._full
        if len(self.order) < self.size:
            self.order = torch.randperm(self.n, generator=self.generator).tolist()
        indices, self.order = self.order[: self.size], self.order[self.size :]
        return self._collate(indices)


def _norms(r: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖r_q‖ over all layers jointly, [Q]."""
    return torch.sqrt(sum(t.double().square().sum((1, 2)) for t in r.values()))  # type: ignore[arg-type]


class LiSSA(Curvature):
    """What fitting ``strategy="lissa"`` keeps: each layer's damping unit trace(G_ll)/D_l.

    The inverse is applied by ``LissaSolver`` at scoring time (it needs the model and the data).
    """

    name = "lissa"
    passes = (CORRECTION,)

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture], draw: int = 0) -> None:
        for name, cap in captures.items():
            st = self.state[name]
            sq = cm.eigenbasis_squares(cap.a, cap.ds, None, None)  # Σ_b DW_b ⊙ DW_b, [O, I]
            if "diagonal_sum" in st:
                st["diagonal_sum"].add_(sq)
            else:
                st["diagonal_sum"] = sq

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        for st in self.state.values():
            st["diagonal"] = st.pop("diagonal_sum") / num_sequences

    def mean_eigenvalue(self, name: str) -> float:
        """trace(G_ll) / D_l, estimated from the squared pseudo-gradients of the fitting pass."""
        return float(self.state[name]["diagonal"].mean())

    def precondition(self, name: str, v: torch.Tensor, damping: float) -> torch.Tensor:
        raise InputError(
            "LiSSA preconditions all tracked layers jointly (the Gauss–Newton Hessian couples them): "
            "use compute_scores / precondition_queries; per-layer preconditioning and self-influence "
            "are not available with strategy='lissa' (use 'ekfac' for self-influence)"
        )

    def self_influence(self, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float) -> torch.Tensor:
        return self.precondition(name, a, damping)


class LissaSolver:
    """α r_J ≈ (G + λI)⁻¹ V over all tracked layers jointly (Eq 10), from the model, task and training data.

    Args:
        model: the model the factors were fitted on.
        task: the task whose loss defines G.
        data: the training examples the mini-batches are drawn from (indexable).
        layers: the tracked layers.
        config: the FactorConfig of the fit (LiSSA's scale, depth, repeats, batch size, seed).
    """

    def __init__(self, model: nn.Module, task: Any, data: Any, layers: dict[str, LayerInfo], config: FactorConfig) -> None:
        if data is None:
            raise InputError("LiSSA needs the training data to form Gauss–Newton-vector products: pass train (or curvature_data)")
        if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            data = list(data)
        if len(data) == 0:
            raise InputError("LiSSA needs a non-empty training set")
        self.model, self.task, self.data, self.layers, self.config = model, task, data, layers, config
        self.report: dict[str, Any] = {}
        self._max_eigenvalue: float | None = None

    def solve(self, grads: dict[str, torch.Tensor], dampings: dict[str, float]) -> dict[str, torch.Tensor]:
        """(G + λI)⁻¹ V for V [Q, O, I] per tracked layer, averaged over the repeats (Eq 10)."""
        missing = sorted(set(self.layers) - set(grads))
        if missing:
            raise ValueError(f"LiSSA preconditions all tracked layers at once; no gradient for {', '.join(missing)}")
        lam = {n: float(dampings[n]) for n in self.layers}
        if not min(lam.values()) > 0:
            raise InputError(
                "LiSSA needs a positive damping λ on every layer (with λ = 0 the series does not converge on the "
                "Gauss–Newton Hessian's null space): set ScoreConfig.damping > 0 or damping_scale > 0"
            )
        cfg = self.config
        v = {n: grads[n] for n in self.layers}
        with eval_mode(self.model), torch.no_grad():
            gnvp = GaussNewtonProduct(self.model, self.task, self.layers)
            device = model_device(self.model)
            if cfg.lissa_scale is not None:
                alpha = float(cfg.lissa_scale)
            else:
                alpha = 1.0 / (self._estimate_max_eigenvalue(gnvp, device, v) + max(lam.values()))
            # The same seed for every call: a query's result does not depend on the others in its batch
            batches = _Batches(self.data, cfg.lissa_batch_size, self.task, device, cfg.seed)
            total = {n: torch.zeros_like(t) for n, t in v.items()}
            for repeat in range(cfg.lissa_repeats):
                r = self._recursion(gnvp, batches, v, lam, alpha, repeat)
                for n in total:
                    total[n].add_(r[n], alpha=alpha)
        return {n: t / cfg.lissa_repeats for n, t in total.items()}

    def _recursion(
        self, gnvp: GaussNewtonProduct, batches: _Batches, v: dict[str, torch.Tensor], lam: dict[str, float], alpha: float, repeat: int
    ) -> dict[str, torch.Tensor]:
        """r_J of Eq 10 for every query; raises LissaDivergenceError when it blows up."""
        cfg = self.config
        lam_min = min(lam.values())
        v_norm = _norms(v)  # [Q]
        bound = DIVERGENCE_FACTOR * v_norm * max(1.0, 1.0 / (alpha * lam_min))
        r = {n: t.clone() for n, t in v.items()}
        update = torch.zeros_like(v_norm)
        norm = v_norm
        with progress(cfg.lissa_depth, f"lissa {repeat + 1}/{cfg.lissa_repeats}", "step") as bar:
            for j in range(cfg.lissa_depth):
                bar.update(1)
                batch = batches.next()
                size = next(iter(batch.values())).shape[0]
                gr = gnvp(batch, size, r)
                new = {n: v[n] + r[n] - alpha * (gr[n] + lam[n] * r[n]) for n in r}
                norm = _norms(new)
                bad = ~torch.isfinite(norm) | (norm > bound)
                if bad.any():
                    q = int(bad.nonzero()[0])
                    raise LissaDivergenceError(
                        f"LiSSA diverged at step {j + 1} of repeat {repeat + 1} (query {q}): ‖r‖ = {float(norm[q]):.3g} "
                        f"{'is not finite' if not math.isfinite(float(norm[q])) else f'exceeds the bound {float(bound[q]):.3g}'}; "
                        f"the scale α = {alpha:.3g} is too large for this curvature (α(μ_max + λ) must stay below 2): "
                        "lower FactorConfig.lissa_scale, raise lissa_batch_size, or raise the damping"
                    )
                update = _norms({n: new[n] - r[n] for n in r}) / norm.clamp_min(torch.finfo(torch.float64).tiny)
                r = new
        self.report = {
            "scale": alpha,
            "depth": cfg.lissa_depth,
            "repeats": cfg.lissa_repeats,
            "batch_size": batches.size,
            "max_eigenvalue_estimate": self._max_eigenvalue,
            "last_relative_update": float(update.max()) if update.numel() else 0.0,
        }
        logger.info("LiSSA: α = %.3g, last relative update %.2e after %d steps", alpha, self.report["last_relative_update"], cfg.lissa_depth)
        return r

    def _estimate_max_eigenvalue(self, gnvp: GaussNewtonProduct, device: torch.device, like: dict[str, torch.Tensor]) -> float:
        """μ̂_max: the largest Rayleigh quotient of a power iteration on mini-batch products (cached)."""
        if self._max_eigenvalue is None:
            cfg = self.config
            batches = _Batches(self.data, cfg.lissa_batch_size, gnvp.task, device, cfg.seed + 1)
            g = torch.Generator().manual_seed(cfg.seed)
            x = {n: torch.randn(like[n].shape[1:], generator=g, dtype=torch.float64).to(like[n]).unsqueeze(0) for n in self.layers}
            best = 0.0
            for step in range(POWER_STEPS):
                scale = _norms(x)
                x = {n: t / scale for n, t in x.items()}
                batch = batches.next()
                gx = gnvp(batch, next(iter(batch.values())).shape[0], x)
                quotient = float(sum((x[n].double() * gx[n].double()).sum() for n in x))
                if step >= min(POWER_WARMUP, POWER_STEPS - 1):
                    best = max(best, quotient)
                if not float(_norms(gx)) > 0:
                    break
                x = gx
            if not (math.isfinite(best) and best > 0):
                raise LissaDivergenceError(
                    f"LiSSA: the power iteration found no positive curvature (μ̂_max = {best}); set FactorConfig.lissa_scale"
                )
            self._max_eigenvalue = best
        return self._max_eigenvalue


__all__ = ["LiSSA", "LissaSolver", "LissaDivergenceError"]
