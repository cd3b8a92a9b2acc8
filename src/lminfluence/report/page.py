"""The whole report page: run summary, query index, one section per query, written atomically."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from html import escape
from pathlib import Path
from typing import Any

from ..storage.layout import FACTORS_DIR, MANIFEST_FILE, REPORT_FILE
from .cards import query_html
from .load import Query, Run, load_run
from .plots import fmt, legend_html
from .style import CSS

logger = logging.getLogger(__name__)

SIGN_NOTE = (
    "A score is the first-order change of log p(completion | prompt) per unit up-weighting of the "
    "training sequence in the mean training objective: <b class=\"pos\">positive</b> means the sequence "
    "raises the probability of the completion, <b class=\"neg\">negative</b> that it lowers it. "
    "Divide by the number of training sequences for the effect of adding one more copy."
)
TIME_KEYS = ("seconds", "elapsed_s", "wall_s", "duration_s", "time_s", "elapsed")


def _get(d: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


def _shorten(text: str, n: int, keep_end: bool = False) -> str:
    lead = " " if text[:1].isspace() else ""  # a completion's leading space is part of it
    text = lead + " ".join(text.split())
    if len(text) <= n:
        return text
    return "…" + text[-(n - 1) :] if keep_end else text[: n - 1] + "…"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _timings(stages: Any) -> list[tuple[str, str]]:
    """Stage → duration from run.json's ``stages`` (a mapping or a list of records), whatever is there."""
    items = stages.items() if isinstance(stages, dict) else (
        (_first(_get(s, "name"), _get(s, "command"), _get(s, "stage"), "?"), s) for s in stages or [] if isinstance(s, dict)
    )  # fmt: skip
    out = []
    for name, info in items:
        secs = info if isinstance(info, (int, float)) else _first(*(_get(info, k) for k in TIME_KEYS))
        if isinstance(secs, (int, float)) and not isinstance(secs, bool):
            out.append((str(name), _duration(float(secs))))
    return out


def summary_rows(run: Run) -> list[tuple[str, str]]:
    """(label, value) pairs for the header, from run.json, config.yaml and the factors manifest."""
    m, c = run.manifest, run.config
    factors_manifest: dict[str, Any] = {}
    fm = run.path / FACTORS_DIR / MANIFEST_FILE
    if fm.is_file():
        try:
            factors_manifest = json.loads(fm.read_text())
        except (OSError, ValueError):
            logger.warning("could not read %s", fm)
    model = _first(m.get("model"), c.get("model"))
    if isinstance(model, dict):
        model = _first(*(model.get(k) for k in ("path", "name_or_path", "name", "id")))
    fingerprint = _first(_get(m, "model.fingerprint"), m.get("model_fingerprint"), factors_manifest.get("fingerprint"))
    strategy = _first(_get(c, "fit.strategy"), m.get("strategy"), factors_manifest.get("strategy"))
    damping = _first(_get(c, "score.damping"), m.get("damping"))
    if damping is None and _first(_get(c, "score.damping_scale"), m.get("damping_scale")) is not None:
        damping = f"{_first(_get(c, 'score.damping_scale'), m.get('damping_scale'))} × mean eigenvalue (per layer)"
    train_size = _first(_get(m, "fit.train_size"), m.get("train_size"), run.num_sequences)
    rank = _first(_get(m, "score.query_rank"), _get(c, "score.rank"), _get(c, "score.query_rank"), m.get("query_rank"))
    candidates = _first(_get(m, "score.candidates"), _get(c, "score.candidates"), m.get("candidates"))
    rescore = _first(_get(m, "score.rescore_top"), _get(c, "score.rescore_top"))
    has_score = isinstance(c.get("score"), dict)
    version = _first(m.get("lminfluence_version"), _get(m, "versions.lminfluence"), m.get("version"))
    rows = [
        ("model", model),
        ("model fingerprint", str(fingerprint)[:16] if fingerprint else None),
        ("strategy", strategy),
        ("damping", damping),
        ("training sequences", f"{int(train_size):,}" if isinstance(train_size, (int, float)) else train_size),
        ("query rank", rank if rank is not None else ("full" if has_score else None)),
        ("candidates (TF-IDF)", candidates if candidates is not None else ("all sequences" if has_score else None)),
        ("re-scored at full rank", f"top and bottom {rescore} per query" if rescore else None),
        ("queries", str(len(run.queries))),
        ("lminfluence", version),
    ]
    stages = m.get("stages") or {k: m[k] for k in ("fit", "score") if isinstance(m.get(k), dict) and "seconds" in m[k]}
    rows += [(f"time: {name}", d) for name, d in _timings(stages)]
    return [(k, str(v)) for k, v in rows if v is not None and v != ""]


def _header(run: Run) -> str:
    cells = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in summary_rows(run))
    return (
        "<header class=\"top\"><h1>Influence report</h1>"
        f'<p class="run">{escape(str(run.path.resolve()))}</p>'
        f'<dl class="summary">{cells}</dl>'
        f'<p class="sign">{SIGN_NOTE}</p>'
        f"{legend_html()}</header>"
    )


def _index(queries: list[Query]) -> str:
    rows = []
    for q in queries:
        best = q.positive[0] if q.positive else None
        score = best.score if best else q.max
        rows.append(
            "<tr>"
            f'<td class="num">{q.index}</td>'
            f'<td><a href="#q-{q.index}">{escape(_shorten(q.id, 40))}</a></td>'
            f'<td class="pc"><span class="prompt">{escape(_shorten(q.prompt, 70, keep_end=True))}</span>'
            f'<mark class="completion">{escape(_shorten(q.completion, 40))}</mark></td>'
            f'<td class="num">{q.logp:.3f}</td>'
            f'<td class="num {"pos" if score >= 0 else "neg"}">{escape(fmt(score, True))}</td>'
            f'<td class="doc">{escape(_shorten(best.doc_id, 40)) if best else "–"}</td>'
            "</tr>"
        )
    return (
        '<section id="index"><h2>Queries</h2><table class="index"><thead><tr>'
        "<th>#</th><th>id</th><th>prompt → <mark class=\"completion\">completion</mark></th>"
        "<th>log p</th><th>best score</th><th>top-1 document</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def render(run: Run) -> str:
    """The report as one self-contained HTML document."""
    title = f"Influence report · {run.path.resolve().name}"
    body = "".join(query_html(q) for q in run.queries) or '<p class="note">queries.parquet has no rows.</p>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f'<body><main>{_header(run)}{_index(run.queries)}{body}'
        '<footer>Written by <code>lminfluence report</code>. Scores follow Grosse et al. (2023), '
        "Eqs 30–31 for the per-block and per-token shares.</footer></main></body></html>\n"
    )


def write_report(run_dir: str | Path, *, output: str | Path | None = None, top: int = 10) -> Path:
    """Write the self-contained HTML report of a run directory.

    Args:
        run_dir: a run directory with run.json and the tables of ``lminfluence score``
            (docs/run-directory.md).
        output: where to write; default ``RUN/report/index.html``.
        top: cards per query, for the most positive and again for the most negative sequences.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: a file the report needs is missing; the message names it and the
            command that writes it.
    """
    run = load_run(run_dir, top)
    out = Path(output) if output is not None else Path(run_dir) / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    html = render(run)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the report from a web server or a colleague
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("report of %d queries written to %s (%.1f KiB)", len(run.queries), out, len(html) / 1024)
    return out
