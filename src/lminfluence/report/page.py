"""The whole report page: run summary, how to read it, query index, query sections, group comparisons.

One self-contained file: inline CSS, SVG and script, the card data compressed in
the page (payload.py), nothing fetched. Without JavaScript the header, the index,
the charts, every card's score and the comparisons still show.
"""

from __future__ import annotations

import logging
import math
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from ..storage.atomic import atomic_write_text
from ..storage.layout import REPORT_FILE
from . import payload
from .cards import query_html
from .colours import LEVELS, tint
from .compare import compare_html, group_anchors
from .load import Query, Run, load_run
from .numbers import column_format, number, percent
from .style import CSS

logger = logging.getLogger(__name__)

SIGN_NOTE = (
    "A score is the first-order change of log p(completion | prompt) per unit up-weighting of the "
    "training sequence in the mean training objective: <b class=\"pos\">positive</b> means the sequence "
    "raises the probability of the completion, <b class=\"neg\">negative</b> that it lowers it. "
    "Divide by the number of training sequences for the effect of adding one more copy."
)
HEAT_NOTE = (
    "<b>Reading a heatmap:</b> a token's colour is its share in predicting the <b>next</b> token. Token t carries "
    "the term of the prediction of token t+1 (Grosse et al. 2023, Eq 31), so the colour sits one token before the "
    "text it supports, and the last token predicts nothing. Click or tap a token, or focus a text and use the arrow "
    "keys, to read <i>token → predicts next: value</i>; click again (or Esc) to unpin."
)
NOSCRIPT = (
    "JavaScript is off: the index, the charts and every score are here, but the texts, token heatmaps and block "
    "charts are drawn by the page's script from data stored compressed in the page."
)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _ranges(blocks: list[int]) -> str:
    blocks = sorted(set(blocks))
    out, start = [], 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] != blocks[i - 1] + 1:
            out.append(str(blocks[start]) if i - 1 == start else f"{blocks[start]}–{blocks[i - 1]}")
            start = i
    return ", ".join(out)


def layer_patterns(layers: list[tuple[str, int]]) -> list[str]:
    """Tracked layer names with the block number as ``*``: ``h.*.mlp.c_fc (blocks 0–3)``."""
    by: dict[str, list[int]] = {}
    for name, block in layers:
        dotted = f".{name}."
        pattern = dotted.replace(f".{block}.", ".*.", 1)[1:-1] if block >= 0 and f".{block}." in dotted else name
        by.setdefault(pattern, []).append(block)
    return [f"{p} (blocks {_ranges(b)})" if "*" in p else p for p, b in by.items()]


def model_name(run: Run) -> str:
    """The model's folder with its parent (``models/SmolLM2-135M``), and its GGUF file if any."""
    model = run.manifest.get("model") or {}
    path = Path(str(model.get("path") or "model"))
    name = "/".join(path.parts[-2:])
    return f"{name}/{Path(model['gguf_file']).name}" if model.get("gguf_file") else name


def summary_rows(run: Run) -> list[tuple[str, str]]:
    """(label, value) pairs for the header, from run.json and config.yaml as `lminfluence` writes them."""
    m, score_cfg = run.manifest, run.config.get("score") or {}
    model, corpus, fit, score = (m.get(k) or {} for k in ("model", "corpus", "fit", "score"))
    damping = score.get("damping") or {}
    if score_cfg.get("damping") is not None:
        rule = f"λ = {number(score_cfg['damping'])} (absolute)"
    else:
        rule = f"{score_cfg.get('damping_scale')} × mean eigenvalue, per layer"
    if damping:
        rule += f"; λ from {number(damping['min'])} to {number(damping['max'])}"
    rows: list[tuple[str, Any]] = [
        ("model", model_name(run)),
        ("model fingerprint", str(model.get("fingerprint") or "")[:16]),
        ("parameters", f"{model['num_parameters'] / 1e6:.2f} M" if model.get("num_parameters") else None),
        ("strategy", fit.get("strategy")),
        ("damping", rule),
        ("corpus", f"{corpus['num_documents']:,} documents · {corpus['num_sequences']:,} sequences of ≤ {corpus['max_length']} tokens" if corpus else None),
        ("query rank", score.get("query_rank") or "full"),
        ("candidates (TF-IDF)", score.get("candidates") or "all sequences"),
        ("re-scored at full rank", f"top and bottom {score['rescore_top']} per query" if score.get("rescore_top") else None),
        ("queries", str(len(run.queries))),
        ("lminfluence", (m.get("versions") or {}).get("lminfluence")),
        ("time", " · ".join(f"{k} {_duration(float(s['seconds']))}" for k, s in (("fit", fit), ("score", score)) if s.get("seconds") is not None)),
    ]
    return [(k, str(v)) for k, v in rows if v is not None and v != ""]


def _header(run: Run) -> str:
    cells = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in summary_rows(run))
    layers = layer_patterns(run.layers)
    return (
        f'<header class="top"><h1>Influence report <span class="model">{escape(model_name(run))}</span></h1>'
        f'<p class="run">{escape(str(run.path.resolve()))}</p>'
        f'<details class="about" open><summary>Run: {escape(model_name(run))}, {len(run.queries)} queries</summary>'
        f'<dl class="summary">{cells}</dl>'
        f'<p class="layers"><b>{len(run.layers)} tracked layers</b> (the scores cover these only): '
        f"{escape('; '.join(layers))}</p></details>"
        f'<p class="sign">{SIGN_NOTE}</p><p class="sign">{HEAT_NOTE}</p>'
        f"{_legend()}</header>"
    )


def _legend() -> str:
    stops = ", ".join(f"{tint(t)} {(t + 1) * 50:.0f}%" for t in (-1.0, -0.5, 0.0, 0.5, 1.0))
    return (
        '<div class="legend" aria-hidden="true">'
        f'<span class="bar" style="background:linear-gradient(to right, {stops})"></span>'
        '<span class="ends"><span>-max: lowers p(next token)</span><span>0</span><span>+max: raises it</span></span></div>'
        f'<p class="note">{LEVELS} colour steps per sign; the maximum is the largest |token score| of the card, the '
        "query or all queries (the switch at the top).</p>"
    )


def _toolbar() -> str:
    options = (("card", "card"), ("query", "query"), ("all", "all queries"))
    radios = "".join(
        f'<label><input type="radio" name="scale" value="{v}"{" checked" if v == "query" else ""}> {t}</label>' for v, t in options
    )
    return (
        f'<div class="toolbar" hidden><a href="#index">index</a><fieldset><legend>colour scale per</legend>{radios}</fieldset>'
        '<button type="button" id="render-all">show every text</button></div>'
        f'<noscript><p class="note banner">{NOSCRIPT}</p></noscript><p class="note banner" id="status" hidden></p>'
    )


def _shorten(text: str, n: int, keep_end: bool = False) -> str:
    lead = " " if text[:1].isspace() else ""  # a completion's leading space is part of it
    text = lead + " ".join(text.split())
    if len(text) <= n:
        return text
    return "…" + text[-(n - 1) :] if keep_end else text[: n - 1] + "…"


def _index(run: Run, anchors: dict[str, str]) -> str:
    queries: list[Query] = run.queries
    sparsity = run.analysis.sparsity
    fmt = column_format([q.positive[0].score for q in queries if q.positive])
    rows = []
    for q in queries:
        best = q.positive[0] if q.positive else None
        tags = " · ".join(escape(t) for t in (q.group, q.language) if t)
        if q.group in anchors:
            tags = f'<a href="#{anchors[q.group]}">{tags}</a>'
        s = sparsity.get(q.index)
        cells = [
            f'<td class="num opt">{q.index}</td>',
            f'<td class="qid"><a href="#q-{q.index}">{escape(_shorten(q.id, 40))}</a>{f"<br><small>{tags}</small>" if tags else ""}</td>',
            (f'<td class="pc"><span class="prompt">{escape(_shorten(q.prompt, 70, keep_end=True))}</span>'
            f'<mark class="completion">{escape(_shorten(q.completion, 40))}</mark></td>'),
            f'<td class="num opt">{q.logp:.3f}</td>',
            f'<td class="num"><a class="{"pos" if best.score >= 0 else "neg"}" href="#q{q.index}-p1">{fmt(best.score, True)}</a></td>'
            if best else '<td class="num">n/a</td>',
            f'<td class="doc"><a href="#q{q.index}-p1">{escape(_shorten(best.doc_id, 40))}</a></td>' if best else "<td>n/a</td>",
        ]
        if sparsity:
            cells.append(f'<td class="num">{percent(s["share_top_1pct"]) if s else "n/a"}</td>')
            alpha = s["alpha"] if s else None
            cells.append(f'<td class="num opt">{alpha:.2f}</td>' if alpha is not None and math.isfinite(alpha) else '<td class="num opt">n/a</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    extra = '<th title="share of positive influence held by the top 1 % of scored sequences">top 1 %</th><th class="opt">α</th>' if sparsity else ""
    return (
        '<section id="index"><h2>Queries</h2><div class="scroll"><table class="index"><thead><tr>'
        '<th class="opt">#</th><th>query</th><th class="pc">prompt → <mark class="completion">completion</mark></th>'
        f'<th class="opt">log p</th><th>top score</th><th>top document</th>{extra}'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _script() -> str:
    return resources.files(__package__).joinpath("client.js").read_text(encoding="utf-8")


def render(run: Run) -> str:
    """The report as one self-contained HTML document."""
    title = f"Influence · {model_name(run)} · {run.path.resolve().name}"
    anchors = group_anchors(run)
    numbers = payload.card_numbers(run)
    body = "".join(query_html(run, q, numbers, anchors.get(q.group or "")) for q in run.queries)
    data = payload.encode(payload.build(run))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body>{_toolbar()}<main>{_header(run)}{_index(run, anchors)}"
        f"{body or '<p class=note>queries.parquet has no rows.</p>'}{compare_html(run)}"
        '<dialog id="doc-view" aria-labelledby="doc-title"><div class="doc-head"><h2 id="doc-title"></h2>'
        '<button type="button" class="close">close</button></div><p class="note doc-info"></p><div class="doc-text"></div></dialog>'
        "<footer>Written by <code>lminfluence report</code>. Scores follow Grosse et al. (2023), Eqs 30–31 for the per-block "
        "and per-token shares.</footer></main>"
        f'<script type="application/octet-stream" id="data" data-encoding="{payload.ENCODING}">{data}</script>'
        f"<script>{_script()}</script></body></html>\n"
    )


def write_report(run_dir: str | Path, *, output: str | Path | None = None, top: int = 10, run: Run | None = None) -> Path:
    """Write the self-contained HTML report of a run directory.

    Args:
        run_dir: a run directory with run.json and the tables of ``lminfluence score``
            (docs/run-directory.md), and optionally those of ``lminfluence analyze``.
        output: where to write; default ``RUN/report/index.html``.
        top: cards per query, for the most positive and again for the most negative sequences.
        run: the run as ``load_run`` read it already (then ``run_dir`` and ``top`` are not read again).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: a file the report needs is missing; the message names it and the
            command that writes it.
        ValueError: a table lacks a column or rows the report needs.
    """
    run = run if run is not None else load_run(run_dir, top)
    out = Path(output) if output is not None else Path(run_dir) / REPORT_FILE
    html = render(run)
    atomic_write_text(out, html)
    logger.info("report of %d queries written to %s (%.1f KiB)", len(run.queries), out, len(html.encode()) / 1024)
    return out
