"""Validated configuration dataclasses, saved next to every artifact."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

Strategy = Literal["identity", "diagonal", "kfac", "ekfac", "lissa"]
FisherType = Literal["sampled", "empirical"]
Algorithm = Literal["auto", "materialize", "project"]

STRATEGIES: tuple[str, ...] = get_args(Strategy)
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_positive_int(what: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class FactorConfig(_Serializable):
    """How the curvature (G + λI) is approximated (METHOD.md §3).

    Attributes:
        strategy: ``identity`` (gradient dot product), ``diagonal``, ``kfac``,
            ``ekfac`` or ``lissa`` (the stochastic Neumann series of Eq 10 over
            all tracked layers jointly; see ``curvature/lissa.py``).
        fisher: ``sampled`` draws the backward-pass labels from the model's own
            predictive distribution (the Gauss–Newton Hessian in expectation);
            ``empirical`` uses the true labels.
        modules: which linear layers to track. ``None`` means the MLP layers of
            every block. Each entry is a preset (``"mlp"``, ``"attention"``) or a
            glob over module names (``"model.layers.*.mlp.down_proj"``).
        seed: seed of the label sampling: a fit is reproducible for the same
            data, batch size and device. LiSSA also draws its mini-batches from it.
        lissa_scale: LiSSA's α in r_j = v + (I - α(G̃ + λI)) r_{j-1} (Eq 10);
            the iteration converges only for α(μ_max + λ) < 2. None picks
            α = 1 / (μ̂_max + λ) from a power iteration on mini-batch
            Gauss–Newton-vector products.
        lissa_depth: J, the number of recursion steps (one mini-batch each).
        lissa_repeats: independent recursions averaged.
        lissa_batch_size: training sequences per Gauss–Newton-vector product.
    """

    strategy: str = "ekfac"
    fisher: str = "sampled"
    modules: tuple[str, ...] | None = None
    seed: int = 0
    lissa_scale: float | None = None
    lissa_depth: int = 1000
    lissa_repeats: int = 1
    lissa_batch_size: int = 8

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("fisher", self.fisher, FISHER_TYPES)
        if isinstance(self.modules, str):
            object.__setattr__(self, "modules", (self.modules,))
        elif self.modules is not None:
            mods = tuple(self.modules)
            if not mods or not all(isinstance(m, str) and m for m in mods):
                raise ValueError(f"modules must be non-empty strings, got {self.modules!r}")
            object.__setattr__(self, "modules", mods)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.lissa_scale is not None and not (
            isinstance(self.lissa_scale, (int, float)) and math.isfinite(self.lissa_scale) and self.lissa_scale > 0
        ):
            raise ValueError(f"lissa_scale must be a finite number > 0 or None (automatic), got {self.lissa_scale!r}")
        _check_positive_int("lissa_depth", self.lissa_depth)
        _check_positive_int("lissa_repeats", self.lissa_repeats)
        _check_positive_int("lissa_batch_size", self.lissa_batch_size)
        if self.strategy == "lissa" and self.fisher != "sampled":
            raise ValueError(
                "strategy='lissa' uses exact Gauss–Newton-vector products; fisher='empirical' does not apply "
                "(leave fisher='sampled')"
            )


@dataclass(frozen=True)
class ScoreConfig(_Serializable):
    """How queries are preconditioned and training sequences scored (METHOD.md §4–5).

    Attributes:
        damping_scale: relative damping: λ = damping_scale × mean eigenvalue,
            per layer. Used when ``damping`` is None.
        damping: absolute damping λ, the same for every layer. When set it is
            used and ``damping_scale`` is ignored.
        query_rank: keep each preconditioned query gradient as a rank-R
            factorisation per layer (the paper's query batching uses 32).
            Layers with min(O, I) ≤ R stay exact. None = full rank.
        per_layer: also return each tracked layer's share of the score (Eq 30).
        per_token: also return each training token's share of the score (Eq 31).
        algorithm: ``auto`` picks per layer the cheaper of materialising each
            sequence's gradient and the projected per-token contraction;
            ``materialize``/``project`` force one (per_token needs ``project``).
    """

    damping_scale: float | None = 0.1
    damping: float | None = None
    query_rank: int | None = None
    per_layer: bool = False
    per_token: bool = False
    algorithm: str = "auto"

    def __post_init__(self) -> None:
        if self.damping is not None:
            if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
                raise ValueError(f"damping must be a finite number ≥ 0, got {self.damping!r}")
        elif self.damping_scale is None:
            raise ValueError("give either damping_scale (relative) or damping (absolute)")
        elif not (math.isfinite(self.damping_scale) and self.damping_scale >= 0):
            raise ValueError(f"damping_scale must be a finite number ≥ 0, got {self.damping_scale!r}")
        _check_positive_int("query_rank", self.query_rank, allow_none=True)
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        if self.per_token and self.algorithm == "materialize":
            raise ValueError("per_token scores need algorithm='project' or 'auto', not 'materialize'")

    def damping_for(self, mean_eigenvalue: float) -> float:
        """The damping λ of one layer whose mean eigenvalue is given."""
        if self.damping is not None:
            return float(self.damping)
        return float(self.damping_scale) * float(mean_eigenvalue)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Execution(_Serializable):
    """How fitting and scoring run: sizes of the work done at once. Never changes a result.

    Attributes:
        batch_size: training sequences per forward/backward pass (fitting and scoring).
        query_batch_size: queries per gradient pass, and queries scored together at full rank.
        cache_gib: memory for keeping EK-FAC's first-pass captures so that its second
            pass replays them instead of running the model again; 0 turns it off.
    """

    batch_size: int = 8
    query_batch_size: int = 16
    cache_gib: float = 4.0

    def __post_init__(self) -> None:
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("query_batch_size", self.query_batch_size)
        if not (isinstance(self.cache_gib, (int, float)) and not isinstance(self.cache_gib, bool) and self.cache_gib >= 0):
            raise ValueError(f"cache_gib must be a number ≥ 0, got {self.cache_gib!r}")


__all__ = ["FactorConfig", "ScoreConfig", "Execution", "STRATEGIES", "FISHER_TYPES", "ALGORITHMS"]
