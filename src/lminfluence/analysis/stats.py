"""Small statistics shared by the analyses: ranks with ties, Spearman correlation, top-k selection."""

from __future__ import annotations

import numpy as np

MIN_PAIRS = 3  # a rank correlation of fewer pairs says nothing (two points always correlate ±1)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (ascending), tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # start of each run of equal values, and its length
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    lengths = np.diff(np.r_[starts, n])
    mean_rank = starts + (lengths + 1) / 2.0  # ranks starts+1 .. starts+length, averaged
    ranks = np.empty(n)
    ranks[order] = np.repeat(mean_rank, lengths)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of the pairs where both are finite; NaN with fewer than 3 or a constant side."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    both = np.isfinite(x) & np.isfinite(y)
    if both.sum() < MIN_PAIRS:
        return float("nan")
    rx, ry = average_ranks(x[both]), average_ranks(y[both])
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def top_k_indices(row: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest finite entries of ``row``, largest first (ties → lower position first).

    The same order as the score stage's top lists; fewer than k when fewer are finite.
    """
    row = np.asarray(row, dtype=np.float64)
    valid = np.flatnonzero(np.isfinite(row))
    order = valid[np.lexsort((valid, -row[valid]))]
    return order[:k]


__all__ = ["average_ranks", "spearman", "top_k_indices", "MIN_PAIRS"]
