"""Validated configuration dataclasses, saved next to every artifact.

Each option is defined once, as a field with its help text in the field's
metadata (``option``): the command line builds its flags and the YAML its
sections from these fields (``cli/options.py``), so a name, a default or a
check lives in one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import ConfigError

Strategy = Literal["identity", "diagonal", "kfac", "ekfac", "lissa"]
FisherType = Literal["sampled", "empirical"]
Algorithm = Literal["auto", "materialize", "project"]
FactorDtype = Literal["auto", "float32", "float64"]
Refine = Literal["none", "cg"]
FactorPlacement = Literal["replicated", "by_layer"]

STRATEGIES: tuple[str, ...] = get_args(Strategy)
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
FACTOR_DTYPES: tuple[str, ...] = get_args(FactorDtype)
REFINES: tuple[str, ...] = get_args(Refine)
FACTOR_PLACEMENTS: tuple[str, ...] = get_args(FactorPlacement)


def option(default: Any, help: str, *, key: str | None = None, flag: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with its command-line help.

    Args:
        default: the default value.
        help: one line for ``--help``.
        key: its name in YAML (default: the field's name).
        flag: its command-line flag (default: ``--key`` with dashes).
        cli: False for options that only the Python API offers.
    """
    return dataclasses.field(default=default, metadata={"help": help, "key": key, "flag": flag, "cli": cli})


def check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{what}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_positive_int(what: str, value: Any, allow_none: bool = False) -> None:
    """Raise ConfigError unless ``value`` is an int ≥ 1 (a bool is not), or None when ``allow_none``."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def check_number(what: str, value: Any, *, minimum: float = 0.0, strict: bool = False, allow_none: bool = False) -> None:
    """A finite real number ≥ ``minimum`` (> with ``strict``), not a bool or a string."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"{'>' if strict else '≥'} {minimum:g}"
        raise ConfigError(f"{what} must be a finite number {bound}{' or None' if allow_none else ''}, got {value!r}")


def check_bool(what: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is True or False (not a string such as 'no')."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")


class Serializable:
    """to_dict / from_dict for a frozen dataclass; unknown keys are refused, naming the known ones."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**data)


@dataclass(frozen=True)
class FactorConfig(Serializable):
    """How the curvature (G + λI) is approximated (docs/method.md §3).

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
        seed: seed of the label sampling (and of LiSSA's mini-batches).
        lissa_scale: LiSSA's α in r_j = v + (I - α(G̃ + λI)) r_{j-1} (Eq 10);
            the iteration converges only for α(μ_max + λ) < 2. None picks
            α = 1 / (μ̂_max + λ) from a power iteration on mini-batch
            Gauss–Newton-vector products.
        lissa_depth: J, the number of recursion steps (one mini-batch each).
        lissa_repeats: independent recursions averaged.
        lissa_batch_size: training sequences per Gauss–Newton-vector product.
        factor_dtype: the dtype the fitted factors are stored and applied in.
            Sums are always accumulated and eigendecomposed in float64; ``auto``
            stores them in float32 (float64 only for a model that computes in
            float64), halving their memory and disk size.
        blocks: cut A and S of every layer into this many diagonal blocks of
            consecutive coordinates (the paper's Appendix A): factor memory and
            eigendecomposition time shrink about k-fold and k²-fold, at some
            accuracy cost (docs/memory.md). 1 = the full matrices.
        label_draws: K, the sets of labels drawn per training sequence in the
            curvature passes of the sampled Fisher (diagonal, kfac, ekfac). One
            forward pass serves K backward passes; S and Λ are averaged over the
            draws, A (label-free) is counted once. Draw 0 is the one-draw fit's,
            so K = 1 is the paper's estimator; more draws cut the sampling noise
            of S and Λ at about one backward pass (and one ``K``-th of the
            covariance work) per extra draw (docs/accuracy.md).
    """

    strategy: Strategy = option("ekfac", "curvature approximation: ekfac, kfac, diagonal, identity (gradient dot product) or lissa")
    fisher: FisherType = option("sampled", "labels of the curvature passes: sampled from the model, or the empirical (true) ones")
    modules: tuple[str, ...] | None = option(None, "comma-separated presets (mlp, attention) or globs over module names; default mlp")
    seed: int = option(0, "seed of the sampled labels (and of LiSSA's mini-batches)")
    lissa_scale: float | None = option(None, "LiSSA's α; default from a power iteration")
    lissa_depth: int = option(1000, "LiSSA recursion steps")
    lissa_repeats: int = option(1, "independent LiSSA recursions averaged")
    lissa_batch_size: int = option(8, "training sequences per Gauss–Newton-vector product of LiSSA")
    factor_dtype: FactorDtype = option("auto", "storage dtype of the factors: auto (float32 unless the model is float64), float32 or float64")
    blocks: int = option(1, "diagonal blocks of A and S per layer (Appendix A), for very wide layers; 1 = full")
    label_draws: int = option(1, "sets of sampled labels per training sequence in the curvature passes (S and Λ averaged over them)")

    def __post_init__(self) -> None:
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("fisher", self.fisher, FISHER_TYPES)
        if isinstance(self.modules, str):
            object.__setattr__(self, "modules", tuple(m.strip() for m in self.modules.split(",") if m.strip()) or self.modules)
        if self.modules is not None:
            if not isinstance(self.modules, (list, tuple)):
                raise ConfigError(f"modules must be a list of names or patterns, got {self.modules!r}")
            mods = tuple(self.modules)
            if not mods or not all(isinstance(m, str) and m for m in mods):
                raise ConfigError(f"modules must be non-empty strings, got {self.modules!r}")
            object.__setattr__(self, "modules", mods)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        check_number("lissa_scale", self.lissa_scale, strict=True, allow_none=True)
        check_positive_int("lissa_depth", self.lissa_depth)
        check_positive_int("lissa_repeats", self.lissa_repeats)
        check_positive_int("lissa_batch_size", self.lissa_batch_size)
        check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        check_positive_int("blocks", self.blocks)
        check_positive_int("label_draws", self.label_draws)
        if self.label_draws > 1 and self.fisher != "sampled":
            raise ConfigError(
                f"label_draws={self.label_draws} needs fisher='sampled': the empirical Fisher uses the true labels, "
                "there is nothing to draw (leave label_draws=1)"
            )
        if self.label_draws > 1 and self.strategy in ("identity", "lissa"):
            raise ConfigError(
                f"label_draws={self.label_draws} applies to the fitted sampled Fishers (diagonal, kfac, ekfac); "
                f"strategy={self.strategy!r} draws no labels (leave label_draws=1)"
            )
        if self.strategy == "lissa" and self.fisher != "sampled":
            raise ConfigError(
                "strategy='lissa' uses exact Gauss–Newton-vector products; fisher='empirical' does not apply "
                "(leave fisher='sampled')"
            )


@dataclass(frozen=True)
class ScoreConfig(Serializable):
    """How queries are preconditioned and training sequences scored (docs/method.md §4–5).

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
        refine: ``cg`` refines each query's preconditioned gradient by
            conjugate gradients on (G + λI) x = ∇g, with G the exact
            Gauss–Newton Hessian over all tracked layers jointly, preconditioned
            by the fitted curvature and started from its solution
            (``scoring/refine.py``); ``none`` keeps the fitted curvature's solution.
        refine_steps: conjugate-gradient steps; each costs one pass over the
            refinement data with Q forward- and reverse-mode products per
            sequence, and one more pass forms the start's residual.
        refine_sample: form the Gauss–Newton products over this many training
            sequences, drawn without replacement with the fit's seed
            (``FactorConfig.seed``); None uses every one.
    """

    damping_scale: float | None = option(0.1, "relative damping: λ = scale × mean eigenvalue, per layer")
    damping: float | None = option(None, "absolute damping λ for every layer, overriding --damping-scale")
    query_rank: int | None = option(None, "rank-R query batching (the paper uses 32); default full rank", key="rank")
    per_layer: bool = option(False, "also return per-layer scores", cli=False)
    per_token: bool = option(False, "also return per-token scores", cli=False)
    algorithm: Algorithm = option("auto", "contraction: auto, materialize or project (the cheaper one per layer by default)")
    refine: Refine = option("none", "refine the preconditioned queries by conjugate gradients on exact Gauss–Newton products (cg) or not (none)")
    refine_steps: int = option(10, "conjugate-gradient steps of --refine cg; each is one pass over the refinement data")
    refine_sample: int | None = option(None, "Gauss–Newton products of --refine cg over this many training sequences (seeded); default all")

    def __post_init__(self) -> None:
        if self.damping is not None:
            check_number("damping", self.damping)
        elif self.damping_scale is None:
            raise ConfigError("give either damping_scale (relative) or damping (absolute)")
        else:
            check_number("damping_scale", self.damping_scale)
        check_positive_int("query_rank", self.query_rank, allow_none=True)
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_bool("per_layer", self.per_layer)
        check_bool("per_token", self.per_token)
        check_choice("refine", self.refine, REFINES)
        if not isinstance(self.refine_steps, int) or isinstance(self.refine_steps, bool) or self.refine_steps < 0:
            raise ConfigError(f"refine_steps must be a non-negative integer, got {self.refine_steps!r}")
        check_positive_int("refine_sample", self.refine_sample, allow_none=True)
        if self.per_token and self.algorithm == "materialize":
            raise ConfigError("per_token scores need algorithm='project' or 'auto', not 'materialize'")

    def damping_for(self, mean_eigenvalue: float) -> float:
        """The damping λ of one layer whose mean eigenvalue is given."""
        if self.damping is not None:
            return float(self.damping)
        return float(self.damping_scale) * float(mean_eigenvalue)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Execution(Serializable):
    """How fitting and scoring run: sizes of the work done at once, memory, checkpoints. Never changes a result.

    Sizes left at None are chosen from the model, the data and the memory
    budget (``lminfluence.memory.plan``); numbers given are used as they are.

    Attributes:
        batch_size: training sequences per forward/backward pass (fitting and
            scoring); None = the largest that fits the budget, up to a few
            thousand tokens per batch.
        query_batch_size: queries per gradient pass; None = chosen like batch_size.
        memory_gib: the memory budget in GiB; None = what the device has
            (free CUDA memory, or the machine's available RAM).
        cache_gib: memory for keeping EK-FAC's first-pass captures so that its second
            pass replays them instead of running the model again; 0 turns it
            off; None = use it when all the captures fit in what the budget leaves.
        checkpoint_seconds: a fit with an ``output_dir`` saves its running sums
            there at this interval and at the end of each pass; a fit killed and
            run again resumes from the last checkpoint. 0 = after every batch.
        offload_factors: keep the factors in CPU memory and move them to the
            model's device one layer at a time, when used (for GPUs whose memory
            cannot hold them all).
        factor_placement: under torch.distributed, ``replicated`` keeps every
            layer's factors on every rank; ``by_layer`` gives each tracked layer
            one owner rank that alone holds its factors (and, when scoring, its
            preconditioned queries), the other ranks sending it their captures
            batch by batch (``lminfluence.curvature.placement``). One process
            ignores it. On the command line, ``fit`` and ``run`` take it
            (``--factor-placement``) for the fit only: their scoring loads the
            saved factors on every rank.
    """

    batch_size: int | None = option(None, "training sequences per forward/backward pass (default: from the memory budget)")
    query_batch_size: int | None = option(None, "queries per gradient pass (default: from the memory budget)")
    memory_gib: float | None = option(None, "memory budget in GiB (default: the device's free memory, or available RAM)")
    cache_gib: float | None = option(None, "memory for replaying EK-FAC's first pass in its second (0 = off; default: when it fits)")
    checkpoint_seconds: float = option(300.0, "seconds between checkpoints of a fit's running sums (0 = every batch)")
    offload_factors: bool = option(False, "keep factors on the CPU, moving one layer at a time to the model's device")
    factor_placement: FactorPlacement = option(
        "replicated", "under torchrun, where a fit's factors live: replicated (every rank) or by_layer (each layer's on one rank; scoring loads all)"
    )

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size, allow_none=True)
        check_positive_int("query_batch_size", self.query_batch_size, allow_none=True)
        check_number("memory_gib", self.memory_gib, strict=True, allow_none=True)
        check_number("cache_gib", self.cache_gib, allow_none=True)
        check_number("checkpoint_seconds", self.checkpoint_seconds)
        check_bool("offload_factors", self.offload_factors)
        check_choice("factor_placement", self.factor_placement, FACTOR_PLACEMENTS)


__all__ = [
    "FactorConfig",
    "ScoreConfig",
    "Execution",
    "Serializable",
    "option",
    "STRATEGIES",
    "FISHER_TYPES",
    "ALGORITHMS",
    "FACTOR_DTYPES",
    "REFINES",
    "FACTOR_PLACEMENTS",
    "check_choice",
    "check_positive_int",
    "check_number",
    "check_bool",
]
