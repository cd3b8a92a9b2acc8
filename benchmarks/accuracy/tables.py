"""Markdown tables of the study's results (printed as it goes, pasted into docs/accuracy.md)."""

from __future__ import annotations

import math
from typing import Any

from .study import LABELS


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _secs(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "–"
    return f"{s:.2f}" if s < 10 else f"{s:.0f}" if s >= 100 else f"{s:.1f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def correlation_table(results: dict[str, dict[str, Any]], key: str, title: str) -> str:
    """One row per method, one column per task: mean ± std over the 10 queries of ``key``."""
    tasks = [t for t in results if key in results[t]]
    methods = [m for m in LABELS if any(m in results[t][key] for t in tasks)]
    rows = []
    for m in methods:
        row = [LABELS[m]]
        for t in tasks:
            cell = results[t][key].get(m)
            row.append(_pm(cell["mean"], cell["std"]) if cell else "–")
        rows.append(row)
    return f"{title}\n\n" + markdown(["method"] + tasks, rows)


def time_table(results: dict[str, dict[str, Any]]) -> str:
    """Seconds per method and task: fit + score (10 queries against every training point)."""
    tasks = [t for t in results if "time" in results[t]]
    methods = [m for m in LABELS if any(m in results[t]["time"] for t in tasks)]
    rows = []
    for m in methods:
        row = [LABELS[m]]
        for t in tasks:
            c = results[t]["time"].get(m)
            if not c:
                row.append("–")
            elif "fit_s" in c:
                row.append(f"{_secs(c['fit_s'] + c['score_s'])} ({_secs(c['fit_s'])} + {_secs(c['score_s'])})")
            else:
                row.append(_secs(c["total_s"]))
        rows.append(row)
    return "Wall time in seconds for 10 measurements, fit + score\n\n" + markdown(["method"] + tasks, rows)


def setup_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for t, r in results.items():
        s = r["setup"]
        rows.append([
            t,
            str(s["n_train"]),
            str(s["n_scored"]),
            str(s["parameters"]),
            s["quality"],
            f"{s['lr']:g} / {s['weight_decay']:g}",
            f"{s['damping']:.3g}",
        ])
    header = ["task", "train N", "scored", "parameters", "test quality", "lr / wd", "λ"]
    return "Setup\n\n" + markdown(header, rows)


__all__ = ["correlation_table", "time_table", "setup_table", "markdown"]
