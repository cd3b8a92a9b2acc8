"""How concentrated influence is: a power-law fit of the upper tail and top-k % shares (docs/method.md §7).

Convention. ``alpha`` is the exponent of the *density*, p(x) ∝ x^(-alpha) for
x ≥ x_min, the number the ``powerlaw`` package reports and the one the paper
quotes (α ≈ 2–4.3). The fit's survival function is P(X > x) = (x/x_min)^(−(alpha − 1))
(docs/method.md §7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Clauset, Shalizi & Newman (2009, §3.3) find the maximum-likelihood exponent
# accurate once the tail holds about 50 points; smaller tails also let a lucky
# handful of points win the KS search, so no x_min with fewer is tried.
MIN_TAIL = 50
# Above this many candidate x_min values the search tries tail sizes spaced
# geometrically (consecutive candidates differ by < 0.5 % in tail size for
# 10⁶ points) instead of every distinct value; the KS search is then linear
# rather than quadratic in the number of points.
MAX_CANDIDATES = 2000
SHARE_FRACTIONS = (0.001, 0.01, 0.1)
CURVE_POINTS = 256
_BLOCK_ELEMENTS = 1 << 22  # entries of one [candidates, points] KS block (32 MiB of float64)


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power law p(x) ∝ x^(-alpha) fitted to the values ≥ x_min.

    Attributes:
        alpha: density exponent (NaN when there was nothing to fit).
        x_min: where the power-law tail starts.
        tail_size: values ≥ x_min.
        ks: Kolmogorov–Smirnov distance between the tail and the fitted law.
        n: positive finite values the fit saw.
    """

    alpha: float
    x_min: float
    tail_size: int
    ks: float
    n: int

    @property
    def ok(self) -> bool:
        return math.isfinite(self.alpha)

    def expected_rank(self, x: np.ndarray) -> np.ndarray:
        """Rank the fitted law gives value x ≥ x_min: tail_size · (x / x_min)^(1 − alpha), for a log-log rank plot."""
        return self.tail_size * (np.asarray(x, dtype=np.float64) / self.x_min) ** (1.0 - self.alpha)


def _no_fit(n: int) -> PowerLawFit:
    return PowerLawFit(alpha=math.nan, x_min=math.nan, tail_size=0, ks=math.nan, n=n)


def fit_power_law(x: np.ndarray, *, min_tail: int = MIN_TAIL, max_candidates: int | None = MAX_CANDIDATES) -> PowerLawFit:
    """Fit a power law to the upper tail of the positive values of ``x`` (Clauset, Shalizi & Newman 2009).

    For each candidate x_min (a distinct value with at least ``min_tail`` values
    at or above it) the exponent is the maximum-likelihood estimate

        alpha = 1 + m / Σ_{x_i ≥ x_min} ln(x_i / x_min)        (m = tail size),

    and the fitted CDF F(x) = 1 − (x / x_min)^(1 − alpha) is compared with the
    tail's empirical CDF by the Kolmogorov–Smirnov distance
    D = max_i |F(x_i) − E_i|, with E_i = (tail values below x_i) / m, the
    convention of Clauset et al.'s code and of the ``powerlaw`` package. The
    x_min with the smallest D wins (ties: the smaller x_min).

    ``alpha`` is the density exponent; the survival function of the fit is
    P(X > x) = (x / x_min)^(−(alpha − 1)).

    The search sorts once and takes every tail's log-sum from one cumulative
    sum; the KS distances are computed for blocks of candidates at a time.

    Args:
        x: scores; zeros, negatives and non-finite values are dropped.
        min_tail: fewest values a tail may hold. With fewer positive values than
            this the fit is NaN (no exception).
        max_candidates: most x_min values tried; None tries every distinct value.

    Returns:
        The fit; ``alpha``, ``x_min`` and ``ks`` are NaN when there was nothing to fit.
    """
    if min_tail < 2:
        raise ValueError(f"min_tail must be at least 2, got {min_tail}")
    x = np.asarray(x, dtype=np.float64).ravel()
    xs = np.sort(x[np.isfinite(x) & (x > 0)])
    n = xs.size
    if n < min_tail:
        return _no_fit(n)
    logs = np.log(xs)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[j] = Σ_{i ≥ j} ln x_i
    left = np.searchsorted(xs, xs, side="left")  # [n] first position of each value: values below it
    tail = n - np.arange(n)  # tail size when x_min = xs[j]
    cand = np.flatnonzero((left == np.arange(n)) & (tail >= min_tail))
    if max_candidates is not None and cand.size > max_candidates:
        sizes = np.unique(np.round(np.geomspace(min_tail, n, max_candidates)).astype(np.int64))
        cand = np.unique(left[n - sizes])  # snapped to the first of equal values
    m = tail[cand]
    spread = suffix[cand] - m * logs[cand]  # Σ ln(x_i / x_min) over the tail
    cand, m, spread = cand[spread > 0], m[spread > 0], spread[spread > 0]  # a tail of one repeated value has no slope
    if cand.size == 0:
        return _no_fit(n)
    alpha = 1.0 + m / spread
    ks = _ks_distances(logs, left, cand, alpha)
    best = int(np.argmin(ks))
    return PowerLawFit(alpha=float(alpha[best]), x_min=float(xs[cand[best]]), tail_size=int(m[best]), ks=float(ks[best]), n=n)


def _ks_distances(logs: np.ndarray, left: np.ndarray, cand: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """KS distance of each candidate's tail from its fitted law, for blocks of candidates at once.

    Candidates come in increasing x_min (decreasing tail); a block spans the
    points of its largest tail, positions below each candidate masked out.
    """
    n = logs.size
    out = np.empty(cand.size)
    start = 0
    while start < cand.size:
        j0 = int(cand[start])
        width = n - j0
        stop = min(cand.size, start + max(1, _BLOCK_ELEMENTS // width))
        c = cand[start:stop, None]  # [B, 1]
        dlog = logs[None, j0:] - logs[c]  # [B, width] ln(x_i / x_min)
        fitted = -np.expm1(-(alpha[start:stop, None] - 1.0) * dlog)  # 1 − (x_i / x_min)^(1 − alpha)
        empirical = (left[None, j0:] - c) / (n - c)
        diff = np.abs(fitted - empirical)
        diff[np.arange(j0, n)[None, :] < c] = 0.0  # points below x_min are not in the tail
        out[start:stop] = diff.max(axis=1)
        start = stop
    return out


def _top_count(fraction: float, n: int) -> int:
    """max(1, ceil(fraction · n)), immune to float noise such as 0.001 · 1000 = 1.0000000000000002."""
    return max(1, math.ceil(round(fraction * n, 9)))


def top_share(scores: np.ndarray, fractions: Sequence[float] = SHARE_FRACTIONS) -> np.ndarray:
    """Share of the total positive influence held by the top fraction f of the scored sequences.

    The top m = max(1, ceil(f · n)) sequences by score (n = finite scores)
    hold Σ max(s, 0) over them; the share divides that by Σ max(s, 0) over all.

    Returns:
        One share per fraction, NaN when no score is positive.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    positive = np.clip(np.sort(s)[::-1], 0.0, None)
    total = positive.sum()
    if s.size == 0 or total <= 0:
        return np.full(len(fractions), np.nan)
    held = np.cumsum(positive)
    return np.array([held[min(_top_count(f, s.size), s.size) - 1] / total for f in fractions])


def rank_curve(scores: np.ndarray, max_points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Points of the positive scores sorted descending, at up to ``max_points`` log-spaced ranks.

    Returns:
        ranks [P] int64 (1-based, from 1 to the number of positive scores) and
        the scores at those ranks [P] float64; empty when none is positive.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    desc = np.sort(s[np.isfinite(s) & (s > 0)])[::-1]
    if desc.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if desc.size <= max_points:
        ranks = np.arange(1, desc.size + 1, dtype=np.int64)
    else:
        ranks = np.unique(np.round(np.geomspace(1, desc.size, max_points)).astype(np.int64))
    return ranks, desc[ranks - 1]


__all__ = ["PowerLawFit", "fit_power_law", "top_share", "rank_curve", "MIN_TAIL", "MAX_CANDIDATES", "SHARE_FRACTIONS", "CURVE_POINTS"]
