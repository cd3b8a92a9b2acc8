"""The methods the LDS benchmark compares: one table, one runner.

A method is a row of ``METHODS``: a label, a kind, and the ``FactorConfig`` and
``ScoreConfig`` fields that make it. Every ``influence`` row is
``fit_factors(FactorConfig(**fit))`` then ``compute_scores(ScoreConfig(**score))``
at the benchmark's damping, so a new estimator is one more row::

    "ekfac_d8": Method("EK-FAC, 8 label draws", fit={"strategy": "ekfac", "label_draws": 8}),
    "ekfac_cg5": Method("EK-FAC + CG, k = 5", fit={"strategy": "ekfac"}, score={"refine": "cg", "refine_steps": 5}),

Kinds other than ``influence``:

- ``tfidf``: the paper's candidate filter used as a method (METHOD.md §6): the
  score of a training sequence is its TF-IDF score for the query's prompt and
  completion tokens. Always ≥ 0: it can rank helpful sequences, never harmful ones.
- ``cosine``: the gradient dot product divided by both gradient norms,
  ⟨∇f_q, ∇L_z⟩ / (‖∇f_q‖ ‖∇L_z‖) over the tracked layers. The norms are
  self-influences under ``identity`` (``compute_self_scores``, which for a
  query example is ‖∇(-f)‖² = ‖∇f‖²). The query's norm does not change its
  LDS (a positive factor per query), the training norms do.

Costs: ``fit_s`` is the factor fit (TF-IDF: building the index), ``score_s``
scoring every training sequence for every query (cosine: with the norms).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import lminfluence as li
from lminfluence.filtering import TfidfIndex


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    Attributes:
        label: the name in the tables.
        kind: ``influence``, ``cosine`` or ``tfidf``.
        fit: ``FactorConfig`` fields (``modules`` and ``seed`` come from the benchmark;
            LiSSA's depth, batch and scale from ``Context.lissa`` unless given here).
        score: ``ScoreConfig`` fields; the benchmark's absolute ``damping`` applies
            unless ``damping_scale`` is given here (relative, per layer).
    """

    label: str
    kind: str = "influence"
    fit: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        return {"kind": self.kind, "fit": dict(self.fit), "score": dict(self.score)}


METHODS: dict[str, Method] = {
    "tfidf": Method("TF-IDF", kind="tfidf"),
    "identity": Method("gradient dot product", fit={"strategy": "identity"}),
    "cosine": Method("gradient cosine", kind="cosine", fit={"strategy": "identity"}),
    "ekfac": Method("EK-FAC", fit={"strategy": "ekfac"}),
    "lissa": Method("LiSSA", fit={"strategy": "lissa"}),
    # EK-FAC at the library's relative damping, λ = scale × each layer's mean eigenvalue (default 0.1)
    **{f"ekfac_s{s:g}": Method(f"EK-FAC, λ = {s:g} × layer mean{' (library default)' if s == 0.1 else ''}", fit={"strategy": "ekfac"},
                               score={"damping_scale": s}) for s in (0.001, 0.01, 0.1, 1.0)},
    # EK-FAC refined by k conjugate-gradient steps on exact Gauss–Newton products over all N sequences
    **{f"ekfac_cg{k}": Method(f"EK-FAC + CG, k = {k}", fit={"strategy": "ekfac"}, score={"refine": "cg", "refine_steps": k})
       for k in (5, 10, 20)},
}


@dataclass
class Context:
    """What every method is run on.

    Attributes:
        model: the scored model.
        train: the N training examples; ``train_tokens`` their token ids.
        queries: the Q query examples (prompt labels -100); ``query_tokens`` their ids.
        modules: tracked layers.
        damping: absolute λ shared by every method that preconditions.
        lissa: ``FactorConfig`` lissa_* fields (depth, batch size).
        batch_size: sequences per pass when fitting and scoring.
        seed: the fits' label-sampling seed.
    """

    model: Any
    train: list[dict]
    train_tokens: list[np.ndarray]
    queries: list[dict]
    query_tokens: list[list[int]]
    modules: tuple[str, ...]
    damping: float
    lissa: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    seed: int = 0


def factor_config(method: Method, ctx: Context) -> li.FactorConfig:
    fit = dict(method.fit)
    if fit.get("strategy") == "lissa":
        fit = {**ctx.lissa, **fit}
    return li.FactorConfig(modules=ctx.modules, seed=ctx.seed, **fit)


def score_config(method: Method, ctx: Context) -> li.ScoreConfig:
    base = {"damping": None} if "damping_scale" in method.score else {"damping": ctx.damping}
    return li.ScoreConfig(**base, **method.score)


def execution(ctx: Context) -> li.Execution:
    return li.Execution(batch_size=ctx.batch_size, query_batch_size=len(ctx.queries))


def run_method(method: Method, ctx: Context) -> dict[str, Any]:
    """Scores [Q, N] (float64; positive = raises f) of one method, and what they cost."""
    if method.kind == "tfidf":
        start = time.perf_counter()
        index = TfidfIndex.build(ctx.train_tokens)
        built = time.perf_counter()
        scores = torch.from_numpy(index.scores(ctx.query_tokens)).double()
        return {"scores": scores, "fit_s": built - start, "score_s": time.perf_counter() - built, "meta": {}}
    if method.kind not in ("influence", "cosine"):
        raise ValueError(f"unknown method kind {method.kind!r}")
    model = ctx.model
    start = time.perf_counter()
    factors = li.fit_factors(model, ctx.train, factor_config(method, ctx), execution=execution(ctx))
    fitted = time.perf_counter()
    cfg = score_config(method, ctx)
    result = li.compute_scores(model, factors, ctx.queries, ctx.train, cfg, execution=execution(ctx))
    scores = result.total.double()
    if method.kind == "cosine":
        if factors.strategy != "identity":
            raise ValueError("the cosine method normalises the plain gradient dot product: give it strategy='identity'")
        train_sq = li.compute_self_scores(model, factors, ctx.train, cfg, execution=execution(ctx)).total.double()  # ‖∇L_z‖², [N]
        query_sq = li.compute_self_scores(model, factors, ctx.queries, cfg, execution=execution(ctx)).total.double()  # ‖∇f_q‖², [Q]
        scores = scores / (query_sq.sqrt()[:, None] * train_sq.sqrt()[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    meta = {k: v for k, v in result.meta.items() if k in ("strategy", "lissa")}
    meta["damping"] = result.meta["damping"]  # per layer
    return {"scores": scores, "fit_s": fitted - start, "score_s": time.perf_counter() - fitted, "meta": meta}


def as_setup(ctx: Context, queries: list[dict] | None = None) -> Any:
    """The accuracy study's ``Setup`` of this context, for its damping and exact-solve helpers."""
    from accuracy.study import Setup

    return Setup(
        name="lds-lm", model=ctx.model, task=li.CausalLMTask(), train=ctx.train,
        queries=ctx.queries if queries is None else queries, modules=ctx.modules,
        scored=np.arange(len(ctx.train)), batch_size=ctx.batch_size,
    )


def curvature_scale(ctx: Context) -> dict[str, float]:
    """trace(G)/P (the mean eigenvalue of the Gauss–Newton Hessian over the tracked layers) and its μ_max.

    The first is the unit of the benchmark's damping, the second sets LiSSA's depth.
    Both are the accuracy study's estimates: the diagonal Fisher's mean, and a
    full-batch power iteration on exact Gauss–Newton-vector products.
    """
    from accuracy.exact import max_eigenvalue
    from accuracy.study import mean_gn_eigenvalue

    setup = as_setup(ctx)
    return {"mean_eigenvalue": mean_gn_eigenvalue(setup, seed=ctx.seed), "max_eigenvalue": max_eigenvalue(setup)}


def exact_scores(ctx: Context, queries: list[int], max_iter: int, tol: float) -> dict[str, Any]:
    """-∇fᵀ(G + λI)⁻¹∇L(z) with the full G (all layers coupled) for the queries at these indices.

    Conjugate gradients on full-batch Gauss–Newton-vector products (the
    accuracy study's ``exact_influence``) at the benchmark's λ: what LiSSA
    converges to, so the check of its depth.
    """
    from accuracy.exact import exact_influence

    return exact_influence(as_setup(ctx, [ctx.queries[i] for i in queries]), ctx.damping, max_iter=max_iter, tol=tol)


__all__ = ["Method", "METHODS", "Context", "run_method", "factor_config", "score_config", "as_setup", "curvature_scale", "exact_scores"]
