"""The paper's spurious-sequence filter on per-token scores (docs/method.md §7).

With a = the per-token scores of a sequence (Eq 31), ‖a‖₂/‖a‖₁ lies between
1/√T (influence spread evenly over T tokens) and 1 (all of it on one token).
The paper flags a sequence whose ratio exceeds 2/3: its influence sits on one
or two tokens, often a shared rare token rather than related content. A
sequence with one or two non-zero token scores always exceeds 2/3 (two equal
ones give 1/√2 ≈ 0.71), whatever it says.
"""

from __future__ import annotations

import numpy as np

SPURIOUS_THRESHOLD = 2.0 / 3.0


def l2_l1_ratio(a: np.ndarray) -> float:
    """‖a‖₂ / ‖a‖₁ of one sequence's per-token scores; NaN when every score is 0 (or there is none)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    l1 = np.abs(a).sum()
    return float(np.sqrt(a @ a) / l1) if l1 > 0 else float("nan")


def grouped_l2_l1(values: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """‖a‖₂ / ‖a‖₁ of consecutive groups of ``values`` (group g = values[starts[g]:starts[g+1]]).

    Args:
        values: [M] per-token scores, grouped by sequence.
        group_starts: [G] increasing start of each group; every group non-empty.

    Returns:
        [G] ratios, NaN for an all-zero group.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(group_starts) == 0:
        return np.zeros(0)
    l1 = np.add.reduceat(np.abs(values), group_starts)
    l2 = np.sqrt(np.add.reduceat(values * values, group_starts))
    out = np.full(l1.shape, np.nan)
    np.divide(l2, l1, out=out, where=l1 > 0)
    return out


def is_spurious(ratio: np.ndarray, threshold: float = SPURIOUS_THRESHOLD) -> np.ndarray:
    """The paper's filter: ratio > 2/3. A NaN ratio (no token carries any score) is not flagged."""
    ratio = np.asarray(ratio, dtype=np.float64)
    return np.greater(ratio, threshold, where=np.isfinite(ratio), out=np.zeros(ratio.shape, dtype=bool))


__all__ = ["l2_l1_ratio", "grouped_l2_l1", "is_spurious", "SPURIOUS_THRESHOLD"]
