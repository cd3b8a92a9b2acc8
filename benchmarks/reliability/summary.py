"""summary.md: passed/failed per category, every failing case with its command and observation, the adapted expectations, all cases."""

from __future__ import annotations

import datetime
import subprocess
from collections import Counter
from pathlib import Path

from harness import Result


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def category_table(results: list[Result]) -> str:
    cats = sorted({r.category for r in results})
    rows = ["| category | cases tried | passed | failed | skipped |", "|---|---:|---:|---:|---:|"]
    total: Counter = Counter()
    for cat in cats:
        c = Counter(r.verdict for r in results if r.category == cat)
        total.update(c)
        rows.append(f"| {cat} | {sum(c.values())} | {c['PASS']} | {c['FAIL']} | {c['SKIP']} |")
    rows.append(f"| **total** | **{sum(total.values())}** | **{total['PASS']}** | **{total['FAIL']}** | **{total['SKIP']}** |")
    return "\n".join(rows)


def write_summary(path: Path, results: list[Result], *, markers: list[str], seconds: float) -> str:
    table = category_table(results)
    lines = [
        "# Reliability review, re-run",
        "",
        f"Commit {_commit()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} minutes. "
        "Produced by `benchmarks/reliability/run.py` (its README says how each case is judged).",
        "",
        table,
        "",
        f"Marker files created by hostile inputs (must be none): {markers or 'none'}.",
        "",
        "## Failing cases",
        "",
    ]
    failing = [r for r in results if r.verdict == "FAIL"]
    if not failing:
        lines.append("None.")
    for r in failing:
        lines += [
            f"### #{r.id} {r.category}: {r.case}",
            "",
            f"- command: `{r.command or '(Python API)'}`",
            f"- expected: {r.expected}",
            f"- observed: {_cell(r.observed, 1200)}",
        ]
        if r.changes:
            lines.append(f"- changed files: {', '.join(r.changes)}")
        if r.stderr_tail:
            lines.append(f"- stderr tail: `{_cell(r.stderr_tail, 600)}`")
        lines.append("")
    skipped = [r for r in results if r.verdict == "SKIP"]
    if skipped:
        lines += ["## Skipped cases", ""] + [f"- #{r.id} {r.case}: {r.observed}" for r in skipped] + [""]
    adapted = [r for r in results if r.adapted]
    if adapted:
        lines += ["## Expectations adapted to the redesign, or made explicit (the review judged some messages by hand)", ""] + [f"- #{r.id} {r.case}: {r.adapted}" for r in adapted] + [""]
    lines += ["## All cases", "", "| # | category | input / case | expected | observed | verdict |", "|---:|---|---|---|---|---|"]
    lines += [f"| {r.id} | {r.category} | {_cell(r.case)} | {_cell(r.expected)} | {_cell(r.observed)} | {r.verdict} |" for r in results]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table


__all__ = ["write_summary", "category_table"]
