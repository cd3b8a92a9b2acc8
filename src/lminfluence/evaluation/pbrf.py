"""PBRF, the proximal Bregman response function (docs/method.md §8, Eqs 7–9): ground truth for influence.

For a trained model θ_s, a training example z and the measurements f of some
queries, the PBRF optimum is

    θ_ε = argmin_θ (1/N) Σ_i D(h(θ, x_i), h(θ_s, x_i)) + ε L(z, θ) + ½ Σ_p λ_p ‖θ_p - θ_s,p‖²

and the PBRF influence of z is (f(θ_ε) - f(θ_s)) / ε. The sum runs over the
N training examples, h are the model outputs, D is the Bregman divergence of
the output loss, and λ the damping. Sign and scale are the library's
(docs/method.md §1): +ε L(z) up-weights z in the mean objective, so a positive value
means up-weighting z raises f, and to first order in ε the PBRF influence is
-∇fᵀ(G + λI)⁻¹∇L(z) with G the Gauss–Newton Hessian of the mean summed loss:
the Hessian of the Bregman term at θ_s.

D defaults to the Bregman divergence of the task's own loss ℓ(h) = L:
D(h, h_s) = ℓ(h) - ℓ(h_s) - ∇ℓ(h_s)·(h - h_s), which is
KL(softmax(h_s) ‖ softmax(h)) summed over the loss-carrying positions for
softmax cross-entropy and ½‖h - h_s‖² for squared error, whatever the labels.
The objective's small differences cancel in float32: run PBRF in float64.

Optimisation. Adam on δ = (θ - θ_s)/ε, which is O(1) for every ε, over the full
training set (accumulated over chunks of ``batch_size``), so the gradient is
exact and convergence is checked, not assumed: a run stops when
‖∇_δ J‖ ≤ tol · ‖∇_δ J(0)‖ = tol · ‖∇L(z, θ_s)‖; its learning rate is halved
(and Adam's moments restarted) when its progress stalls. A point that does not
converge within ``max_steps`` raises ``PBRFConvergenceError`` (or, with
``strict=False``, is returned flagged). The steps needed grow with the
condition number (μ_max(G) + λ)/λ: a few hundred at 10–100, thousands beyond;
with the small relative damping of LMs it can reach 10⁴–10⁵, where a larger λ
(the same in the estimator) or a looser tol is the practical choice.
Several points (and both signs with ``central=True``, which returns
(f(θ_{+ε}) - f(θ_{-ε})) / 2ε, exact to O(ε²)) are optimised at once with
``torch.func.vmap`` over stacked parameter copies. With ``output_dir`` each
finished point is written there (``points/<index>.json``, atomic) and skipped
when the call is repeated: a long job resumes where it stopped.

Usage::

    from lminfluence.evaluation import PBRFConfig, pbrf_influence

    scores = li.compute_scores(model, factors, queries, train, li.ScoreConfig(), task=task)
    truth = pbrf_influence(
        model, train, queries, indices=range(100), damping=scores.meta["damping"],
        modules=["*"],                 # the estimator's tracked layers (FactorConfig.modules; None there = "mlp")
        task=task, output_dir="pbrf/", config=PBRFConfig(epsilon=1e-3),
    )
    truth.influence                    # [Q, len(indices)], compare with scores.total[:, truth.indices]
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..curvature.gnvp import TaskModule
from ..errors import InputError, PBRFConvergenceError
from ..fingerprint import tensors_fingerprint
from ..hooks.modules import resolve_modules
from ..passes import batches, collate_to, eval_mode, model_device
from ..progress import progress
from ..task.base import Task
from ._files import check_settings, read_json, write_json
from ._optim import solve

logger = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
# Outputs and output-gradients at θ_s are cached per chunk while they take at most this many bytes
REFERENCE_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class PBRFConfig:
    """How the PBRF objective is solved.

    Attributes:
        epsilon: ε, the up-weighting of z (small: the PBRF influence is a finite difference).
        central: also solve for -ε and return (f(θ_{+ε}) - f(θ_{-ε})) / 2ε.
        lr: Adam's initial learning rate on δ = (θ - θ_s)/ε. None: 0.1 × the
            root-mean-square of ∇L(z)/λ (the proximal-only solution, which
            overshoots; the halving brings it down).
        max_steps: Adam steps allowed per point.
        tol: convergence when ‖∇J‖ ≤ tol · ‖∇J at θ_s‖.
        patience: steps without a new lowest gradient norm before the learning rate is halved.
        points_per_batch: training points optimised together (vmapped).
        batch_size: training examples per chunk of the full-batch objective; None = all at once.
        strict: raise PBRFConvergenceError for points that do not converge;
            False returns them with ``converged`` False.
    """

    epsilon: float = 1e-3
    central: bool = False
    lr: float | None = None
    max_steps: int = 5000
    tol: float = 1e-7
    patience: int = 10
    points_per_batch: int = 8
    batch_size: int | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        for name in ("epsilon", "tol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0 or None (automatic), got {self.lr!r}")
        for name in ("max_steps", "patience", "points_per_batch") + (("batch_size",) if self.batch_size is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class PBRFResult:
    """PBRF influences of some training points on every query.

    Attributes:
        influence: [Q, P], column j for training index ``indices[j]`` (the library's sign and scale).
        indices: the training indices, in the order asked for.
        converged: [P] whether every run of the point met the tolerance.
        steps: [P] Adam steps taken (the most over a point's runs).
        rel_grad: [P] final ‖∇J‖ / ‖∇J(θ_s)‖ (the largest over a point's runs).
        computed: indices optimised by this call (the others were read from ``output_dir``).
        meta: the settings.
    """

    influence: torch.Tensor
    indices: list[int]
    converged: torch.Tensor
    steps: torch.Tensor
    rel_grad: torch.Tensor
    computed: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def bregman_divergence(task: Task, h: torch.Tensor, h_s: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """D(h, h_s) = ℓ(h) - ℓ(h_s) - ∇ℓ(h_s)·(h - h_s) per example, [B], with ℓ the task's loss.

    Softmax cross-entropy gives KL(softmax(h_s) ‖ softmax(h)) summed over the
    loss-carrying positions; squared error ½(h - y)² gives ½‖h - h_s‖².
    """
    with torch.enable_grad():
        ref = h_s.detach().requires_grad_(True)
        loss_s = task.loss(ref, batch)
        (g_s,) = torch.autograd.grad(loss_s.sum(), ref)
    return _bregman_from(task, h, batch, h_s.detach(), loss_s.detach(), g_s)


def _bregman_from(task, h, batch, h_s, loss_s, g_s) -> torch.Tensor:
    return task.loss(h, batch) - loss_s - (g_s * (h - h_s)).reshape(h.shape[0], -1).sum(1)


def _parameter_dampings(
    model: nn.Module, modules: Sequence[str] | None, damping: float | Mapping[str, float]
) -> dict[str, float]:
    """λ for each optimised parameter (names as in ``model.named_parameters()``)."""
    if modules is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        owners = {n: n.rpartition(".")[0] for n in names}
    else:
        owners = {}
        for mod_name, mod in resolve_modules(model, modules).items():
            for pname, _ in mod.named_parameters(recurse=False):
                owners[f"{mod_name}.{pname}"] = mod_name
    if isinstance(damping, Mapping):
        missing = sorted({o for o in owners.values() if o not in damping})
        if missing:
            raise ValueError(f"damping has no value for module(s) {', '.join(missing[:4])} whose parameters PBRF optimises")
        out = {n: float(damping[o]) for n, o in owners.items()}
    else:
        out = {n: float(damping) for n in owners}
    bad = [n for n, lam in out.items() if not (math.isfinite(lam) and lam > 0)]
    if bad:
        raise ValueError(
            f"PBRF needs a finite damping λ > 0 for every parameter (the proximal term keeps θ_ε near θ_s); "
            f"got {out[bad[0]]!r} for {bad[0]}: pass the estimator's damping, e.g. scores.meta['damping']"
        )
    return out


class _Objective:
    """J(δ) = (1/(Nε²)) Σ_i D_i + s (L(z, θ) - L(z, θ_s))/ε + ½ Σ λ ‖δ‖², θ = θ_s + εδ, vmapped over runs."""

    def __init__(self, model, task, train, params, dampings, epsilon, batch_size, divergence, device) -> None:
        self.module = TaskModule(model, task)
        self.task = task
        self.theta = {f"model.{n}": p for n, p in params.items()}
        self.lam = {f"model.{n}": lam for n, lam in dampings.items()}
        self.eps = epsilon
        self.divergence = divergence
        self.device = device
        self.num_train = len(train)
        self.chunks = [self._collate(c) for c in batches(train, batch_size or len(train))]
        self._refs: list[tuple] | None = None
        first = self._reference(self.chunks[0])
        size = sum(t.numel() * t.element_size() for t in first if t is not None) * len(self.chunks)
        if size <= REFERENCE_CACHE_BYTES:
            self._refs = [first] + [self._reference(c) for c in self.chunks[1:]]

    def _collate(self, examples) -> dict[str, torch.Tensor]:
        return collate_to(self.task, list(examples), self.device)

    def outputs(self, delta: Params, batch) -> torch.Tensor:
        theta = {k: t + self.eps * delta[k] for k, t in self.theta.items()}
        return functional_call(self.module, theta, (batch,))

    def _reference(self, batch) -> tuple:
        """h_s, ℓ(h_s) per example, ∇_h ℓ(h_s) for one chunk (the last None with a custom divergence)."""
        with torch.no_grad():
            h_s = functional_call(self.module, self.theta, (batch,)).detach()
        if self.divergence is not None:
            return h_s, None, None
        with torch.enable_grad():
            h = h_s.clone().requires_grad_(True)
            loss = self.task.loss(h, batch)
            (g_s,) = torch.autograd.grad(loss.sum(), h)
        return h_s, loss.detach(), g_s

    def _bregman(self, delta: Params, batch, h_s, loss_s, g_s) -> torch.Tensor:
        h = self.outputs(delta, batch)
        if self.divergence is not None:
            d = self.divergence(h, h_s, batch)
        else:
            d = _bregman_from(self.task, h, batch, h_s, loss_s, g_s)
        return d.sum() / (self.num_train * self.eps**2)

    def _z_term(self, delta: Params, pick: torch.Tensor, z: dict[str, torch.Tensor], sign: torch.Tensor, loss_zs: torch.Tensor) -> torch.Tensor:
        # Every run sees the whole (unbatched) batch of the K examples and keeps its own through the
        # one-hot ``pick``: vmapping the batch itself would put a batched attention mask through
        # the model, whose data-dependent checks (Hugging Face's SDPA masks) vmap cannot follow.
        loss = (self.task.loss(self.outputs(delta, z), z) * pick).sum()
        return sign * (loss - loss_zs) / self.eps

    def z_losses(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """L(z_k, θ_s) of each run's example, [K]."""
        with torch.no_grad():
            return self.task.loss(functional_call(self.module, self.theta, (z,)), z)

    def value_and_grad(self, delta: Params, z, signs, loss_zs) -> tuple[torch.Tensor, Params]:
        """J and ∇_δ J for every run, [K] and {name: [K, ...]}."""
        def first(delta, pick, sign, loss_zs, z, batch, *ref):  # the z term rides along with the first chunk
            return self._z_term(delta, pick, z, sign, loss_zs) + self._bregman(delta, batch, *ref)

        pick = torch.eye(signs.shape[0], dtype=signs.dtype, device=signs.device)  # [K, K]

        for i, batch in enumerate(self.chunks):
            ref = self._refs[i] if self._refs is not None else self._reference(batch)
            if i == 0:
                g, v = vmap(grad_and_value(first), in_dims=(0, 0, 0, 0) + (None,) * 5)(delta, pick, signs, loss_zs, z, batch, *ref)
                value, grads = v, g
            else:
                g, v = vmap(grad_and_value(self._bregman), in_dims=(0,) + (None,) * 4)(delta, batch, *ref)
                value = value + v
                grads = {k: grads[k] + g[k] for k in grads}
        for k, d in delta.items():
            value = value + 0.5 * self.lam[k] * d.reshape(d.shape[0], -1).square().sum(1)
            grads[k] = grads[k] + self.lam[k] * d
        return value, grads


def pbrf_influence(
    model: nn.Module,
    train: Sequence[Mapping[str, Any]],
    queries: Iterable[Mapping[str, Any]],
    indices: Iterable[int] | None = None,
    config: PBRFConfig = PBRFConfig(),
    *,
    damping: float | Mapping[str, float],
    task: Task | None = None,
    modules: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    divergence: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> PBRFResult:
    """PBRF influence (f(θ_ε) - f(θ_s)) / ε of training points on every query (Eqs 7–9).

    Args:
        model: the trained model θ_s (left unchanged; run in eval mode).
        train: all N training examples (the Bregman term runs over them); indexable.
        queries: examples whose ``task.measurement`` is f.
        indices: which training points z to compute; None = all N.
        config: ε, central difference, Adam and convergence settings.
        damping: λ of the proximal term, one number or per module name (e.g.
            ``scores.meta["damping"]``); must be positive.
        task: defaults to CausalLMTask().
        modules: which parameters move: the weights and biases of the modules
            matching these patterns (as ``FactorConfig.modules``); None = every
            trainable parameter. Match the estimator's tracked layers.
        output_dir: write each finished point there and skip points already written.
        divergence: D(h, h_s, batch) -> [B] instead of the task loss's Bregman divergence.

    Raises:
        PBRFConvergenceError: a point did not converge (``strict``), after the
            converged points of its batch were written.
    """
    from ..task.causal_lm import CausalLMTask

    if not isinstance(config, PBRFConfig):
        raise TypeError(f"config must be a PBRFConfig, got {type(config).__name__}")
    task = task or CausalLMTask()
    train, queries, indices = _check_data(train, queries, indices)
    dampings = _parameter_dampings(model, modules, damping)
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in dampings}
    if any(p.dtype != torch.float64 for p in params.values()):
        logger.warning("PBRF differences of order ε² cancel badly below float64; convert the model with .double()")
    settings = json.loads(json.dumps({
        "config": {k: v for k, v in asdict(config).items() if k not in ("points_per_batch", "batch_size", "strict")},
        "damping": dampings,
        "num_train": len(train),
        "num_queries": len(queries),
        "fingerprint": tensors_fingerprint(params.items()),
        "divergence": None if divergence is None else getattr(divergence, "__qualname__", repr(divergence)),
    }))  # fmt: skip
    out_dir = Path(output_dir) if output_dir is not None else None
    done: dict[int, dict[str, Any]] = {}
    if out_dir is not None:
        check_settings(out_dir / "pbrf.json", settings, "PBRF results")
        done = {i: read_json(out_dir / "points" / f"{i}.json") for i in indices if (out_dir / "points" / f"{i}.json").is_file()}
    pending = [i for i in indices if i not in done]
    computed: list[int] = []
    failed: list[int] = []
    if pending:
        # torch.func.grad ignores the outer no_grad: only the parameters that are not optimised stop building graphs
        with eval_mode(model), torch.no_grad():
            obj = _Objective(model, task, train, params, dampings, config.epsilon, config.batch_size, divergence, model_device(model))
            for rec in _solve_points(obj, task, train, queries, pending, config):
                if not rec["converged"]:
                    logger.warning("PBRF point %d: not converged after %d steps (‖∇J‖ ratio %.2e)", rec["index"], rec["steps"], rec["rel_grad"])
                    if config.strict:
                        failed.append(rec["index"])
                        continue
                done[rec["index"]] = rec
                computed.append(rec["index"])
                if out_dir is not None:
                    write_json(out_dir / "points" / f"{rec['index']}.json", rec)
    if failed:
        raise PBRFConvergenceError(
            f"PBRF did not converge for training point(s) {failed} within max_steps={config.max_steps} "
            f"(tol={config.tol}): raise PBRFConfig.max_steps, set lr, or loosen tol; strict=False returns them flagged"
        )
    recs = [done[i] for i in indices]
    return PBRFResult(
        influence=torch.tensor([r["influence"] for r in recs], dtype=torch.float64).T.reshape(len(queries), len(indices)),
        indices=indices,
        converged=torch.tensor([r["converged"] for r in recs], dtype=torch.bool),
        steps=torch.tensor([r["steps"] for r in recs], dtype=torch.long),
        rel_grad=torch.tensor([r["rel_grad"] for r in recs], dtype=torch.float64),
        computed=computed,
        meta=settings,
    )


def _check_data(train: Any, queries: Iterable[Mapping[str, Any]], indices: Iterable[int] | None) -> tuple[Any, list, list[int]]:
    """The training set (indexable), the queries and the distinct training indices to compute."""
    if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
        train = list(train)
    queries = list(queries)
    if len(train) == 0 or len(queries) == 0:
        raise InputError("PBRF needs at least one training example and one query")
    N = len(train)
    chosen = list(range(N)) if indices is None else [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < N]
    if bad or len(set(chosen)) != len(chosen):
        raise InputError(f"indices must be distinct training indices in [0, {N}); got {bad[:4] or 'duplicates'}")
    return train, queries, chosen


def _solve_points(obj: _Objective, task: Task, train: Any, queries: list, pending: list[int], config: PBRFConfig) -> Iterable[dict[str, Any]]:
    """Solve the PBRF objective for the pending points, ``points_per_batch`` at a time (vmapped); one record per point.

    Stops after the first batch holding a point that did not converge when ``config.strict``.
    """
    device = obj.device
    q_batch = collate_to(task, queries, device)

    def measure(delta: Params) -> torch.Tensor:
        return task.measurement(obj.outputs(delta, q_batch), q_batch)

    f_s = task.measurement(functional_call(obj.module, obj.theta, (q_batch,)), q_batch)  # [Q]
    signs_per_point = (1.0, -1.0) if config.central else (1.0,)
    S = len(signs_per_point)
    dtype = next(iter(obj.theta.values())).dtype
    with progress(len(pending), "pbrf", "point") as bar:
        for start in range(0, len(pending), config.points_per_batch):
            group = pending[start : start + config.points_per_batch]
            runs = [(i, s) for i in group for s in signs_per_point]
            z = collate_to(task, [train[i] for i, _ in runs], device)
            signs = torch.tensor([s for _, s in runs], dtype=dtype, device=device)
            delta, conv, steps, rel = solve(obj, z, signs, obj.z_losses(z), config)
            f = vmap(measure)(delta)  # [K, Q]
            converged_all = True
            for j, i in enumerate(group):
                rows = slice(j * S, (j + 1) * S)
                infl = (f[j * S] - f[j * S + 1]) / (2 * config.epsilon) if config.central else (f[j * S] - f_s) / config.epsilon
                rec = {
                    "index": i,
                    "influence": infl.double().cpu().tolist(),
                    "converged": bool(conv[rows].all()),
                    "steps": int(steps[rows].max()),
                    "rel_grad": float(rel[rows].max()),
                }
                converged_all = converged_all and bool(rec["converged"])
                yield rec
            bar.update(len(group))
            if config.strict and not converged_all:
                return


__all__ = ["PBRFConfig", "PBRFResult", "PBRFConvergenceError", "pbrf_influence", "bregman_divergence"]
