"""The report's colours: the diverging heatmap scale, the ink on each level, and WCAG contrast.

Orange raises p(completion | prompt), blue lowers it, white is zero. Every heatmap
level carries the ink that reads on it with a contrast of at least
``MIN_CONTRAST`` (WCAG AA for body text): dark ink wherever it passes, white only
where dark ink does not.
"""

from __future__ import annotations

import math

WARM = (217, 72, 1)  # positive: raises p(completion | prompt)
COOL = (33, 102, 172)  # negative: lowers it
LEVELS = 32  # heatmap colour steps per sign
MIN_CONTRAST = 4.5  # WCAG 2 AA, normal text
INK = "#222222"  # the page's text colour
INKS = (INK, "#000000", "#ffffff")  # tried in this order on each heatmap level
# text colours, each ≥ MIN_CONTRAST on every background it is used on (tests/test_report.py checks them)
MUTED = "#6b6b6b"  # secondary text
POS_TEXT = "#b03a00"  # a positive number as text (WARM itself is 4.2:1 on the card head)
NEG_TEXT = "#1f5e9e"  # a negative number as text
CARD_HEAD = "#fbfbfa"
AXIS = "#9a9a9a"


def mix(t: float) -> tuple[int, int, int]:
    """Colour of a value t in [-1, 1]: blue below zero, white at zero, warm above."""
    t = max(-1.0, min(1.0, t))
    end = WARM if t >= 0 else COOL
    a = abs(t)
    return tuple(round(255 + (c - 255) * a) for c in end)  # type: ignore[return-value]


def hex_colour(rgb: tuple[int, int, int]) -> str:
    """#rrggbb of an RGB triple."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def tint(t: float) -> str:
    """The heatmap colour of a value in [-1, 1] (blue below 0, orange above), as #rrggbb."""
    return hex_colour(mix(t))


def parse_colour(colour: str) -> tuple[int, int, int]:
    """``#rrggbb`` or ``rgb(r, g, b)`` (as a browser reports a computed colour) → (r, g, b)."""
    colour = colour.strip()
    if colour.startswith("#") and len(colour) == 7:
        return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
    if colour.startswith("rgb"):
        parts = colour[colour.index("(") + 1 : colour.index(")")].split(",")
        return int(float(parts[0])), int(float(parts[1])), int(float(parts[2]))
    raise ValueError(f"not a colour: {colour!r}")


def luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG 2 relative luminance of an sRGB colour."""

    def channel(c: int) -> float:
        x = c / 255
        return x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str | tuple[int, int, int], b: str | tuple[int, int, int]) -> float:
    """WCAG 2 contrast ratio of two colours, from 1 to 21."""
    la, lb = (luminance(parse_colour(c) if isinstance(c, str) else c) for c in (a, b))
    hi, lo = max(la, lb), min(la, lb)
    return (hi + 0.05) / (lo + 0.05)


def ink_on(background: str) -> str:
    """The first of INKS that reads on ``background`` with at least MIN_CONTRAST."""
    for ink in INKS:
        if contrast(ink, background) >= MIN_CONTRAST:
            return ink
    raise ValueError(f"no ink reads on {background}")  # cannot happen: black or white always reaches 4.58:1


def level(t: float) -> str:
    """The heatmap class of a value t in [-1, 1]: ``p1``..``p{LEVELS}`` warm, ``n1``.. blue, "" near zero."""
    if not math.isfinite(t):
        return ""
    k = math.floor(min(abs(t), 1.0) * LEVELS + 0.5)  # half up, as client.js rounds
    return "" if k == 0 else f"{'p' if t > 0 else 'n'}{k}"


def level_colours() -> dict[str, tuple[str, str]]:
    """Heatmap class → (background, ink)."""
    out = {}
    for k in range(1, LEVELS + 1):
        for sign, t in (("p", k / LEVELS), ("n", -k / LEVELS)):
            bg = tint(t)
            out[f"{sign}{k}"] = (bg, ink_on(bg))
    return out


def level_css() -> str:
    """One rule per heatmap class."""
    return "\n".join(f".heat .{cls}{{background:{bg};color:{ink}}}" for cls, (bg, ink) in level_colours().items())


__all__ = ["COOL", "LEVELS", "WARM", "contrast", "hex_colour", "ink_on", "level", "level_colours", "level_css", "mix", "tint"]
