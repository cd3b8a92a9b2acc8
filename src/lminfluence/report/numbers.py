"""How the report writes numbers: one format per column, ASCII signs, so that a value pastes as a number.

A column's format follows its largest magnitude M: fixed decimals that give M three
significant digits when 1e-3 ≤ M < 1e7 (``+877``, ``+1566``, ``-12``), scientific
notation for every value of the column otherwise (``+1.57e-06``). The client script
(client.js ``numberFormat``) implements the same rule for the values it shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

PLAIN_MIN, PLAIN_MAX = 1e-3, 1e7
Format = Callable[..., str]


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def decimals_for(peak: float) -> int | None:
    """Decimals that give ``peak`` three significant digits, or None for scientific notation."""
    if peak == 0:
        return 0
    if not PLAIN_MIN <= peak < PLAIN_MAX:
        return None
    return max(0, 2 - math.floor(math.log10(peak)))


def column_format(values: Iterable[float | None]) -> Format:
    """A formatter for every number of one column (or one chart, one card list): ``f(x, signed=False)``."""
    finite = _finite(values)
    decimals = decimals_for(max((abs(v) for v in finite), default=0.0))

    def fmt(x: float | None, signed: bool = False) -> str:
        if x is None or not math.isfinite(float(x)):
            return "n/a"
        spec = ("+" if signed else "") + (f".{decimals}f" if decimals is not None else ".2e")
        return format(float(x), spec)

    return fmt


def number(x: float | None, signed: bool = False) -> str:
    """One number on its own, with three significant digits."""
    return column_format([x])(x, signed)


def percent(x: float | None) -> str:
    """A share in [0, 1] as a percentage with one decimal."""
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    return f"{100 * float(x):.1f}%"


__all__ = ["column_format", "decimals_for", "number", "percent"]
