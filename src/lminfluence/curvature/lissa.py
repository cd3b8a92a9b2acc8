"""LiSSA (Eq 10): the stochastic Neumann series for (G + λI)⁻¹ v, all tracked layers jointly.

    r_0 = v,   r_j = v + (I - α(G̃_j + λI)) r_{j-1},   (G + λI)⁻¹ v ≈ α r_J

G̃_j v is a Gauss–Newton-vector product on the j-th mini-batch of B training
sequences, G̃ v = (1/B) Σ_b J_bᵀ H_b J_b v, built from three products and no
matrix: J_b v forward-mode (``torch.func.jvp``) through the model with respect
to the tracked layers' W̄ = [W | b]; H_b u, the Hessian of the task's
per-sequence loss with respect to the model outputs (softmax cross-entropy:
diag(p) - ppᵀ per loss-carrying position; squared error: the identity), as a
forward-over-reverse product; and J_bᵀ u reverse-mode (``torch.func.vjp``).
G is on the library's scale (METHOD.md §1): the mean over sequences of each
sequence's summed-loss Gauss–Newton matrix. Unlike EK-FAC, LiSSA keeps the
blocks that couple layers.

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

The products need the model and the training data at preconditioning time:
``fit_factors`` keeps a reference to ``train`` (in memory, never saved), and
``compute_scores`` passes its model and task. Factors loaded from disk need
the data again (``attach_data``). Self-influence is not available (one
recursion per training sequence).

Usage::

    import lminfluence as li
    from lminfluence.curvature.lissa import attach_data

    cfg = li.FactorConfig(strategy="lissa", modules=["*"], lissa_depth=500, lissa_batch_size=32)
    factors = li.fit_factors(model, train, cfg, task=task)
    scores = li.compute_scores(model, factors, queries, train, li.ScoreConfig(damping=1e-3), task=task)
    scores.meta["lissa"]              # α used, μ̂_max, last relative update

    factors = li.load_factors(path, model)
    attach_data(factors, train)       # before scoring with reloaded LiSSA factors
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from ..config import FactorConfig
from ..hooks.collector import LayerCapture
from ..hooks.modules import LayerInfo
from ..passes import eval_mode, model_device
from . import math as cm
from .base import CORRECTION, Curvature

logger = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 10.0  # ‖r_j‖ beyond this many times the converged bound ‖v‖·max(1, 1/(αλ)) is divergence
POWER_STEPS = 20  # power-iteration steps estimating μ_max for the automatic scale
POWER_WARMUP = 3  # Rayleigh quotients before this step are not used


class LissaDivergenceError(FloatingPointError):
    """The LiSSA recursion grew without bound: the scale α is too large for the curvature."""


class LissaDataError(ValueError):
    """LiSSA factors have no training data to form Gauss–Newton-vector products with."""


class _TaskModule(nn.Module):
    """The task's forward as a module, so that ``functional_call`` can swap the tracked parameters."""

    def __init__(self, model: nn.Module, task: Any) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.forward(self.model, batch)


def wbar_to_params(name: str, info: LayerInfo, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split W̄ [..., O, I] into the layer's parameters (Conv1D stores the weight [in, O])."""
    w = v[..., : info.in_features]  # [..., O, in]
    out = {f"model.{name}.weight": w.transpose(-1, -2) if info.kind == "conv1d" else w}
    if info.bias:
        out[f"model.{name}.bias"] = v[..., info.in_features]  # [..., O]
    return out


def params_to_wbar(name: str, info: LayerInfo, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of ``wbar_to_params``: the layer's parameters as W̄ [..., O, I]."""
    w = p[f"model.{name}.weight"]
    w = w.transpose(-1, -2) if info.kind == "conv1d" else w
    if info.bias:
        w = torch.cat([w, p[f"model.{name}.bias"].unsqueeze(-1)], dim=-1)
    return w


class GaussNewtonProduct:
    """v ↦ G̃ v = (1/B) Σ_b J_bᵀ H_b J_b v on one mini-batch, for Q stacked vectors at once."""

    def __init__(self, model: nn.Module, task: Any, layers: dict[str, LayerInfo]) -> None:
        self.module = _TaskModule(model, task)
        self.task = task
        self.layers = layers
        named = dict(self.module.named_parameters())
        self.params = {}
        for n, info in layers.items():
            for key in wbar_to_params(n, info, torch.zeros(info.out_dim, info.in_dim)):
                self.params[key] = named[key].detach()

    def __call__(self, batch: dict[str, torch.Tensor], size: int, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G̃ v for W̄-shaped v [Q, O, I] per layer; ``size`` = B, the sequences in ``batch``."""

        def outputs(p):
            return functional_call(self.module, p, (batch,))

        def loss(h):
            return self.task.loss(h, batch).sum()

        tangents: dict[str, torch.Tensor] = {}
        for n, info in self.layers.items():
            for key, t in wbar_to_params(n, info, v[n]).items():
                tangents[key] = t.to(self.params[key].dtype)
        # fused attention kernels have no forward-mode derivative; the math kernel is the same function
        with sdpa_kernel([SDPBackend.MATH]):
            out, pull = vjp(outputs, self.params)
            jv = vmap(lambda t: jvp(outputs, (self.params,), (t,))[1])(tangents)  # [Q, *out]: J v
        _, hessian = vjp(grad(loss), out)  # H_out is symmetric: its vjp is H_out u (reverse-over-reverse)
        (hjv,) = vmap(hessian)(jv)  # [Q, *out]: H_out J v
        (back,) = vmap(pull)(hjv)  # Jᵀ H_out J v, per parameter [Q, ...]
        return {n: params_to_wbar(n, info, back).to(v[n].dtype) / size for n, info in self.layers.items()}


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
        return {k: t.to(self.device) for k, t in self.task.collate([self.data[int(i)] for i in indices]).items()}

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
    """(G + λI)⁻¹ v by the stochastic Neumann series of Eq 10 (see the module docstring)."""

    name = "lissa"
    passes = (CORRECTION,)
    joint = True

    def __init__(self, layers: dict[str, LayerInfo], config: FactorConfig | None = None) -> None:
        super().__init__(layers, config if config is not None else FactorConfig(strategy="lissa"))
        self.data: Any = None
        self.report: dict[str, Any] = {}
        self._max_eigenvalue: float | None = None

    # ------------------------------------------------------------- fitting: the damping unit

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture]) -> None:
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

    def attach_data(self, train: Any) -> None:
        """Keep (a reference to) the training data whose mini-batches form the products."""
        if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
            train = list(train)
        if len(train) == 0:
            raise ValueError("LiSSA needs a non-empty training set")
        self.data = train
        self._max_eigenvalue = None

    # ------------------------------------------------------------- preconditioning

    def precondition(self, name: str, v: torch.Tensor, damping: float) -> torch.Tensor:
        raise NotImplementedError(
            "LiSSA preconditions all tracked layers jointly (the Gauss–Newton Hessian couples them): "
            "use compute_scores / precondition_queries; per-layer preconditioning and self-influence "
            "are not available with strategy='lissa' (use 'ekfac' for self-influence)"
        )

    def self_influence(self, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float) -> torch.Tensor:
        return self.precondition(name, a, damping)

    def describe(self) -> dict[str, Any]:
        return {"lissa": dict(self.report)} if self.report else {}

    def precondition_all(
        self, grads: dict[str, torch.Tensor], dampings: dict[str, float], *, model: Any = None, task: Any = None
    ) -> dict[str, torch.Tensor]:
        """α r_J ≈ (G + λI)⁻¹ V for V [Q, O, I] per tracked layer, averaged over the repeats (Eq 10)."""
        if model is None or task is None:
            raise ValueError("LiSSA needs the model and the task to form Gauss–Newton-vector products")
        if self.data is None:
            raise LissaDataError(
                "these LiSSA factors carry no training data (factors loaded from disk never do): call "
                "lminfluence.curvature.lissa.attach_data(factors, train) with the training set before scoring"
            )
        missing = sorted(set(self.layers) - set(grads))
        if missing:
            raise ValueError(f"LiSSA preconditions all tracked layers at once; no gradient for {', '.join(missing)}")
        lam = {n: float(dampings[n]) for n in self.layers}
        if not min(lam.values()) > 0:
            raise ValueError(
                "LiSSA needs a positive damping λ on every layer (with λ = 0 the series does not converge on the "
                "Gauss–Newton Hessian's null space): set ScoreConfig.damping > 0 or damping_scale > 0"
            )
        cfg = self.config
        v = {n: grads[n] for n in self.layers}
        with eval_mode(model), torch.no_grad():
            gnvp = GaussNewtonProduct(model, task, self.layers)
            device = model_device(model)
            if cfg.lissa_scale is not None:
                alpha = float(cfg.lissa_scale)
            else:
                alpha = 1.0 / (self._estimate_max_eigenvalue(gnvp, device, v) + max(lam.values()))
            # The same seed for every call: a query's result does not depend on the others in its batch
            batches = _Batches(self.data, cfg.lissa_batch_size, task, device, cfg.seed)
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
        for j in tqdm(range(cfg.lissa_depth), desc=f"lissa {repeat + 1}/{cfg.lissa_repeats}", disable=None, leave=False):
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


def attach_data(factors: Any, train: Any) -> None:
    """Give LiSSA factors (e.g. loaded from disk) the training data their products need."""
    if not isinstance(getattr(factors, "curvature", None), LiSSA):
        raise ValueError(f"attach_data is for LiSSA factors; these use {getattr(factors, 'strategy', '?')!r}")
    factors.curvature.attach_data(train)


__all__ = ["LiSSA", "GaussNewtonProduct", "LissaDivergenceError", "LissaDataError", "attach_data"]
