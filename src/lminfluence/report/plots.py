"""Number formatting, the diverging colour scale, and the inline SVG charts of the report.

Every function returns a string of HTML/SVG; nothing here reads files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

# The diverging scale: white at 0, these at ±(max |score| of the card).
WARM = (217, 72, 1)  # positive: raises p(completion | prompt)
COOL = (33, 102, 172)  # negative: lowers it
LEVELS = 32  # heatmap colour steps per sign
WHITE_TEXT = 0.55  # above this share of the card's max |score| a token's text turns white
INK = "#222"
MUTED = "#767676"
AXIS = "#9a9a9a"


def fmt(x: float | None, signed: bool = False) -> str:
    """Three significant digits; scientific notation when |x| is small or large."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    a = abs(x)
    body = f"{a:.3g}" if 1e-2 <= a < 1e4 else f"{a:.2e}"
    sign = "−" if x < 0 else ("+" if signed else "")
    return sign + body


def mix(t: float) -> tuple[int, int, int]:
    """Colour of a value t in [-1, 1]: blue below zero, white at zero, warm above."""
    t = max(-1.0, min(1.0, t))
    end = WARM if t >= 0 else COOL
    a = abs(t)
    return tuple(round(255 + (c - 255) * a) for c in end)  # type: ignore[return-value]


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def tint(t: float) -> str:
    return hex_colour(mix(t))


def level(t: float) -> str:
    """The heatmap class of a value t in [-1, 1]: ``p1``..``p{LEVELS}`` warm, ``n1``.. blue, "" near zero.

    Classes rather than inline colours keep a 2000-token card about a third smaller; the
    title attribute keeps the exact score.
    """
    if not math.isfinite(t):
        return ""
    k = round(min(abs(t), 1.0) * LEVELS)
    return "" if k == 0 else f"{'p' if t > 0 else 'n'}{k}"


def level_css() -> str:
    """One rule per heatmap class; from WHITE_TEXT on the text turns white to stay readable."""
    rules = []
    for k in range(1, LEVELS + 1):
        ink = "color:#fff;" if k / LEVELS > WHITE_TEXT else ""
        rules.append(f".tok.p{k}{{background:{tint(k / LEVELS)};{ink}}}")
        rules.append(f".tok.n{k}{{background:{tint(-k / LEVELS)};{ink}}}")
    return "\n".join(rules)


def _ticks_text(x: float, y: float, text: str, anchor: str = "middle", size: int = 10, colour: str = MUTED) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{colour}" text-anchor="{anchor}">{escape(text)}</text>'


def histogram_svg(
    edges: Sequence[float],
    counts: Sequence[int],
    marks: Sequence[float] = (),
    width: int = 560,
    height: int = 170,
) -> str:
    """Histogram of one query's scores over every scored sequence, with a zero line.

    Args:
        edges: bin edges (one more than ``counts``).
        counts: sequences per bin.
        marks: scores to show as ticks under the axis (the sequences shown below it).
    """
    if len(edges) != len(counts) + 1 or not counts:
        return '<p class="note">No score histogram in queries.parquet.</p>'
    left, right, top, bottom = 44, 12, 10, 40
    w, h = width - left - right, height - top - bottom
    lo, hi = float(edges[0]), float(edges[-1])
    if not hi > lo:
        hi = lo + 1.0
    peak = max(max(counts), 1)

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * w

    parts = [
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="histogram of scores">'
    ]
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        if c <= 0:
            continue
        mid = (a + b) / 2
        fill = tint(0.45) if a >= 0 else tint(-0.45) if b <= 0 else "#c8c8c8"
        bh = max(c / peak * h, 1.0)
        parts.append(
            f'<rect x="{x(a):.1f}" y="{top + h - bh:.1f}" width="{max(x(b) - x(a) - 0.6, 0.6):.1f}" '
            f'height="{bh:.1f}" fill="{fill}"><title>{escape(fmt(a))} … {escape(fmt(b))}: {c} sequences'
            f" (bin centre {escape(fmt(mid))})</title></rect>"
        )
    base = top + h
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + w}" y2="{base}" stroke="{AXIS}" stroke-width="1"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="{AXIS}" stroke-width="1"/>')
    parts.append(_ticks_text(left - 5, top + 8, str(max(counts)), "end"))
    parts.append(_ticks_text(left - 5, base, "0", "end"))
    parts.append(
        f'<text x="{left - 30}" y="{top + h / 2:.1f}" font-size="10" fill="{MUTED}" text-anchor="middle" '
        f'transform="rotate(-90 {left - 30} {top + h / 2:.1f})">sequences</text>'
    )
    parts.append(_ticks_text(x(lo), base + 26, fmt(lo), "start"))
    parts.append(_ticks_text(x(hi), base + 26, fmt(hi), "end"))
    if lo <= 0 <= hi:
        zx = x(0.0)
        parts.append(
            f'<line class="zero" x1="{zx:.1f}" y1="{top - 4}" x2="{zx:.1f}" y2="{base + 4}" '
            f'stroke="{INK}" stroke-width="1.2" stroke-dasharray="3 2"/>'
        )
        if x(lo) + 40 < zx < x(hi) - 40:
            parts.append(_ticks_text(zx, base + 26, "0"))
    for m in marks:
        if lo <= m <= hi:
            mx = x(m)
            parts.append(
                f'<line x1="{mx:.1f}" y1="{base + 3}" x2="{mx:.1f}" y2="{base + 12}" '
                f'stroke="{tint(1.0 if m >= 0 else -1.0)}" stroke-width="1.5"><title>{escape(fmt(m, True))}</title></line>'
            )
    parts.append(_ticks_text(left + w / 2, height - 2, "score (ticks: sequences shown below)", size=10))
    parts.append("</svg>")
    return "".join(parts)


def blocks_svg(values: Sequence[float] | None, width: int = 250, height: int = 96) -> str:
    """Bar chart of a score split over transformer blocks: bars up for positive, down for negative."""
    if not values:
        return '<p class="note">No per-block scores.</p>'
    left, right, top, bottom = 6, 6, 16, 22
    w, h = width - left - right, height - top - bottom
    peak = max(abs(v) for v in values) or 1.0
    step = w / len(values)
    zero = top + h / 2
    parts = [
        f'<svg class="blocks" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="score per transformer block">'
    ]
    for i, v in enumerate(values):
        bh = abs(v) / peak * (h / 2)
        y = zero - bh if v >= 0 else zero
        fill = tint(0.75 if v >= 0 else -0.75)
        parts.append(
            f'<rect class="{"pos" if v >= 0 else "neg"}" x="{left + i * step + step * 0.12:.1f}" y="{y:.1f}" '
            f'width="{max(step * 0.76, 0.8):.1f}" height="{max(bh, 0.5):.1f}" fill="{fill}">'
            f"<title>block {i}: {escape(fmt(v, True))}</title></rect>"
        )
    parts.append(f'<line x1="{left}" y1="{zero}" x2="{left + w}" y2="{zero}" stroke="{AXIS}" stroke-width="1"/>')
    parts.append(_ticks_text(left + step / 2, height - 8, "0", size=9))
    if len(values) > 1:
        parts.append(_ticks_text(left + w - step / 2, height - 8, str(len(values) - 1), size=9))
    parts.append(_ticks_text(left + w / 2, height - 8, "block", size=9))
    parts.append(_ticks_text(left + w, 9, f"bars to ±{fmt(peak)}", "end", size=9))
    parts.append("</svg>")
    return "".join(parts)


def legend_html() -> str:
    """The heatmap's colour bar: blue (lowers p) through white to warm (raises p)."""
    stops = ", ".join(f"{tint(t)} {(t + 1) * 50:.0f}%" for t in (-1.0, -0.5, 0.0, 0.5, 1.0))
    return (
        '<div class="legend">'
        f'<span class="bar" style="background:linear-gradient(to right, {stops})"></span>'
        '<span class="ends"><span>−max |token score|<br>lowers p(completion)</span>'
        "<span>0</span>"
        "<span>+max |token score|<br>raises p(completion)</span></span>"
        "</div>"
    )
