"""The per-query charts as inline SVG: score histogram (log counts), log-log rank plot, layer profile.

Every function returns a string of SVG; nothing here reads files. Charts share a
360 × 200 viewBox and scale down to the width of a phone. The per-card block
charts are drawn by the page's script (client.js) from the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from .colours import AXIS, INK, MUTED, tint
from .numbers import column_format, number, percent

W, H = 360, 200
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 12, 44


def _text(x: float, y: float, text: str, anchor: str = "middle", size: float = 11, colour: str = MUTED, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{colour}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def _open(cls: str, label: str) -> str:
    return f'<svg class="chart {cls}" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(label)}">'


def _frame(y_label: str, x_label: str) -> list[str]:
    base, right = H - BOTTOM, W - RIGHT
    return [
        f'<line x1="{LEFT}" y1="{base}" x2="{right}" y2="{base}" stroke="{AXIS}"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="{AXIS}"/>',
        _text(12, TOP + (base - TOP) / 2, y_label, extra=f' transform="rotate(-90 12 {TOP + (base - TOP) / 2:.1f})"'),
        _text(LEFT + (right - LEFT) / 2, H - 4, x_label),
    ]


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    span = hi - lo if hi > lo else 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def histogram_svg(edges: Sequence[float], counts: Sequence[int], marks: Sequence[float] = ()) -> str:
    """Histogram of one query's scan scores over every scored sequence, counts on a log axis.

    Args:
        edges: bin edges (one more than ``counts``).
        counts: sequences per bin.
        marks: scores drawn as ticks under the axis (the sequences shown as cards).
    """
    if len(edges) != len(counts) + 1 or not counts or max(counts) <= 0:
        return '<p class="note">No score histogram in queries.parquet.</p>'
    fmt = column_format([edges[0], edges[-1]])
    lo, hi = float(edges[0]), float(edges[-1])
    x = _scale(lo, hi if hi > lo else lo + 1, LEFT, W - RIGHT)
    top_count = 10 ** math.ceil(math.log10(max(max(counts), 2)))
    base = H - BOTTOM
    y = _scale(math.log10(0.5), math.log10(top_count), base, TOP)  # a bin of one sequence stays visible
    total = sum(counts)
    parts = [_open("hist", f"histogram of the scan scores of {total} sequences, counts on a log scale, from {fmt(lo, True)} to {fmt(hi, True)}")]
    for a, b, c in zip(edges[:-1], edges[1:], counts):  # kept short: one per bin, a report has hundreds of these
        if c <= 0:
            continue
        cls = "w" if a >= 0 else "c" if b <= 0 else "m"  # warm, cool, mixed: colours in style.py
        top = y(math.log10(c))
        parts.append(
            f'<rect class="{cls}" x="{x(a):.0f}" y="{top:.0f}" width="{max(x(b) - x(a) - 0.5, 0.6):.1f}" height="{base - top:.0f}">'
            f"<title>{fmt(a)}…{fmt(b)}: {c}</title></rect>"
        )
    parts += _frame("sequences (log)", "score · ticks: the sequences shown below")
    t = 1
    while t <= top_count:
        parts.append(f'<line x1="{LEFT - 3}" y1="{y(math.log10(t)):.1f}" x2="{LEFT}" y2="{y(math.log10(t)):.1f}" stroke="{AXIS}"/>')
        parts.append(_text(LEFT - 5, y(math.log10(t)) + 4, str(t), "end", 10))
        t *= 10
    parts.append(_text(LEFT, base + 26, fmt(lo, True), "start", 10))
    parts.append(_text(W - RIGHT, base + 26, fmt(hi, True), "end", 10))
    if lo < 0 < hi:
        zx = x(0.0)
        parts.append(f'<line class="zero" x1="{zx:.1f}" y1="{TOP}" x2="{zx:.1f}" y2="{base + 4}" stroke="{INK}" stroke-dasharray="3 2"/>')
        if x(lo) + 44 < zx < x(hi) - 44:
            parts.append(_text(zx, base + 26, "0", size=10))
    for sign, colour in ((1, tint(1.0)), (-1, tint(-1.0))):  # one path per sign for the ticks of the shown sequences
        ticks = "".join(f"M{x(m):.1f} {base + 3}v10" for m in marks if lo <= m <= hi and (m >= 0) == (sign > 0))
        if ticks:
            parts.append(f'<path class="marks" d="{ticks}" stroke="{colour}" stroke-width="1.5"/>')
    parts.append("</svg>")
    return "".join(parts)


def power_of_ten(k: int) -> str:
    """10^k as a short tick label: 0.001 … 1000000, else 1e-05."""
    return f"{10.0**k:.{max(0, -k)}f}" if -3 <= k <= 6 else f"1e{k}"


def _log_ticks(lo: float, hi: float) -> list[int]:
    """Integer powers of ten within [lo, hi] (log10 values)."""
    return list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))


def power_law_line(alpha: float | None, x_min: float | None, n_tail: int | None) -> list[tuple[float, float]] | None:
    """The fitted law as (rank, score) at ranks 1 and n_tail, or None without a usable fit.

    For a density p(x) ∝ x^(-α) above x_min, the expected rank of x among the
    tail's n sequences is n (x / x_min)^(1 - α): on log-log axes the straight
    line x(r) = x_min (r / n)^(-1 / (α - 1)), r = 1 … n.
    """
    if alpha is None or x_min is None or not n_tail or not (math.isfinite(alpha) and math.isfinite(x_min)):
        return None
    if alpha <= 1 or x_min <= 0 or n_tail < 1:
        return None
    return [(float(r), x_min * (r / n_tail) ** (-1.0 / (alpha - 1.0))) for r in (1, n_tail)]


def rank_svg(sparsity: dict[str, Any]) -> str:
    """Log-log plot of the positive scores against their rank, with the fitted power law over its tail."""
    ranks, scores = sparsity["curve_rank"], sparsity["curve_score"]
    pts = [(math.log10(r), math.log10(s)) for r, s in zip(ranks, scores) if r >= 1 and s > 0]
    if len(pts) < 2:
        return '<p class="note">Fewer than two positive scores: no rank plot.</p>'
    alpha = sparsity["alpha"]
    line = power_law_line(alpha, sparsity["x_min"], sparsity["tail_size"])
    fit = [(math.log10(r), math.log10(v)) for r, v in line] if line else None
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + ([p[1] for p in fit] if fit else [])
    x = _scale(0.0, max(max(xs), 1.0), LEFT, W - RIGHT)
    ylo, yhi = math.floor(min(ys)), math.ceil(max(ys))
    y = _scale(ylo, yhi if yhi > ylo else ylo + 1, H - BOTTOM, TOP)
    parts = [_open("rank", f"positive scores against their rank on log-log axes, {len(pts)} points" + (f", power law alpha {alpha:.2f}" if fit else ""))]
    parts += _frame("score (log)", "rank among positive scores (log)")
    for k in _log_ticks(0, max(xs)):
        parts.append(_text(x(k), H - BOTTOM + 14, power_of_ten(k), size=10))
    for k in _log_ticks(ylo, yhi):
        parts.append(_text(LEFT - 5, y(k) + 4, power_of_ten(k), "end", 10))
        parts.append(f'<line x1="{LEFT - 3}" y1="{y(k):.1f}" x2="{LEFT}" y2="{y(k):.1f}" stroke="{AXIS}"/>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(a):.1f},{y(b):.1f}" for i, (a, b) in enumerate(pts))
    parts.append(f'<path d="{path}" fill="none" stroke="{tint(1.0)}" stroke-width="2"/>')
    if fit:
        (a0, b0), (a1, b1) = fit
        parts.append(f'<line class="fit" x1="{x(a0):.1f}" y1="{y(b0):.1f}" x2="{x(a1):.1f}" y2="{y(b1):.1f}" stroke="{INK}" stroke-dasharray="5 3"/>')
        parts.append(_text(W - RIGHT, TOP + 10, f"power law α = {alpha:.2f}", "end", 11, INK))
    parts.append("</svg>")
    return "".join(parts)


def sparsity_caption(s: dict[str, Any]) -> str:
    """One sentence: the concentration of positive influence and the fit."""
    shares = " · ".join(percent(s[k]) for k in ("share_top_0_1pct", "share_top_1pct", "share_top_10pct"))
    fit = (
        f"Power-law fit above x_min = {number(s['x_min'])} ({s['tail_size']} sequences in the tail, KS distance {s['ks']:.3f}): "
        f"α = {s['alpha']:.2f}."
        if s["alpha"] is not None and math.isfinite(s["alpha"])
        else "No power-law fit."
    )
    return (
        f"The top 0.1 % · 1 % · 10 % of the {s['num_scored']:,} scored sequences hold <b>{shares}</b> of the positive "
        f"influence ({s['num_positive']:,} sequences score above 0). {escape(fit)} Dashed: the fitted law."
    )


def layers_svg(shares: Sequence[tuple[str, int, str, float]]) -> str:
    """Bars of each tracked layer's share of the query's top sequences' influence, in block order, thirds shaded."""
    if not shares:
        return '<p class="note">No layer shares.</p>'
    values = [s for *_, s in shares]
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    x = _scale(0, len(shares), LEFT, W - RIGHT)
    y = _scale(lo, hi if hi > lo else lo + 1, H - BOTTOM, TOP + 16)  # the top 16 units hold the names of the thirds
    parts = [_open("layers", "share of influence per tracked layer: " + ", ".join(f"{n} {percent(s)}" for n, _, _, s in shares))]
    start = 0
    for i in range(1, len(shares) + 1):  # shaded bands for the thirds, labelled
        if i == len(shares) or shares[i][2] != shares[start][2]:
            if shares[start][2] == "middle":
                parts.append(f'<rect x="{x(start):.1f}" y="{TOP}" width="{x(i) - x(start):.1f}" height="{H - BOTTOM - TOP}" fill="#f0f0ee"/>')
            parts.append(_text((x(start) + x(i)) / 2, TOP + 8, shares[start][2], size=10))
            start = i
    for i, (name, block, _, share) in enumerate(shares):
        top, bottom = sorted((y(share), y(0.0)))
        parts.append(
            f'<rect x="{x(i) + 0.12 * (x(1) - x(0)):.1f}" y="{top:.1f}" width="{max(0.76 * (x(1) - x(0)), 0.8):.1f}" '
            f'height="{max(bottom - top, 0.5):.1f}" fill="{tint(0.8 if share >= 0 else -0.8)}">'
            f"<title>{escape(name)} (block {block}): {percent(share)}</title></rect>"
        )
    blocks = [b for _, b, _, _ in shares]
    step = max(1, math.ceil(len(set(blocks)) / 12))  # at most about 12 block labels
    firsts = [i for i in range(len(blocks)) if i == 0 or blocks[i] != blocks[i - 1]]
    for n, i in enumerate(firsts):
        j = firsts[n + 1] if n + 1 < len(firsts) else len(blocks)
        if n % step == 0:
            parts.append(_text((x(i) + x(j)) / 2, H - BOTTOM + 14, str(blocks[i]), size=10))
    parts.append(f'<line x1="{LEFT}" y1="{y(0.0):.1f}" x2="{W - RIGHT}" y2="{y(0.0):.1f}" stroke="{AXIS}"/>')
    parts += _frame("share", "transformer block")
    for v in sorted({lo, hi, 0.0}):
        parts.append(_text(LEFT - 5, y(v) + 4, percent(v), "end", 10))
    parts.append("</svg>")
    return "".join(parts)


def thirds_caption(t: dict[str, float]) -> str:
    """The caption of a layer profile: each third's share, and how well scoring with one third keeps the ranking."""
    shares = " · ".join(f"{k} {percent(t[f'share_{k}'])}" for k in ("lower", "middle", "upper"))
    rho = " · ".join(f"{k} {t[f'spearman_{k}']:.2f}" if math.isfinite(t[f"spearman_{k}"]) else f"{k} n/a" for k in ("lower", "middle", "upper"))
    return f"Share of the top sequences' influence by third of the layers: {shares}. Ranking kept when scoring with one third only (Spearman): {rho}."


__all__ = ["histogram_svg", "layers_svg", "power_law_line", "rank_svg", "sparsity_caption", "thirds_caption"]
