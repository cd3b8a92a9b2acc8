"""One query's section of the report: prompt and completion, score histogram, sequence cards.

A card shows one training sequence: its rank, score and provenance, its text as a
token heatmap (docs/method.md §5: token t carries the term of predicting token t+1, so
tokens.parquet's score is shown on its own token), and its score per block.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

from .load import Query, Shown
from .plots import blocks_svg, fmt, histogram_svg, level


def _token_text(token: str) -> str:
    text = escape(token)
    if "\n" in token:  # a newline has no width to colour: mark it, then break the line
        text = text.replace("\n", '<span class="nl">↵</span>\n')
    return text


def heatmap_html(tokens: list[str], scores: np.ndarray) -> str:
    """The sequence's tokens, each on a background coloured by its score over the card's max |score|."""
    peak = float(np.nanmax(np.abs(scores))) if np.isfinite(scores).any() else 0.0
    parts = []
    for token, s in zip(tokens, scores.tolist()):
        cls = level(s / peak) if peak > 0 else ""
        parts.append(f'<span class="tok{" " + cls if cls else ""}" title="{escape(fmt(s, True))}">{_token_text(token)}</span>')
    return "".join(parts)


def _caption(s: Shown) -> str:
    if s.tokens is None or s.token_scores is None:
        return '<p class="note">No per-token scores for this sequence in tokens.parquet: plain text shown.</p>'
    finite = np.isfinite(s.token_scores)
    peak = float(np.max(np.abs(s.token_scores[finite]))) if finite.any() else 0.0
    total = float(np.sum(s.token_scores))
    return (
        f'<p class="cap">{len(s.tokens)} tokens · colour scale ±{escape(fmt(peak))} (max |token score|) · '
        f"Σ tokens = {escape(fmt(total, True))}</p>"
    )


def card_html(s: Shown, anchor: str) -> str:
    """One training sequence: header line, token heatmap, per-block bars."""
    sign = "pos" if s.score >= 0 else "neg"
    extra = []
    if s.first_stage_score is not None and not math.isclose(s.first_stage_score, s.score, rel_tol=1e-6, abs_tol=0.0):
        extra.append(f"scan {escape(fmt(s.first_stage_score, True))}")
    if s.tfidf is not None:
        extra.append(f"tf-idf {escape(fmt(s.tfidf))}")
    if s.tokens is not None and s.token_scores is not None:
        body = f'<div class="text heat">{heatmap_html(s.tokens, s.token_scores)}</div>'
    else:
        body = f'<div class="text plain">{escape(s.text)}</div>'
    return (
        f'<article class="card" id="{anchor}">'
        '<header class="card-head">'
        f'<span class="rank">#{abs(s.rank)}</span>'
        f'<span class="score {sign}" title="{s.score!r}">{escape(fmt(s.score, True))}</span>'
        f'<span class="prov"><b>{escape(s.doc_id)}</b> · chunk {s.chunk} · chars {s.char_start}–{s.char_end}'
        f" · seq {s.seq_index}</span>"
        + (f'<span class="extra">{" · ".join(extra)}</span>' if extra else "")
        + "</header>"
        '<div class="card-body"><div class="card-main">'
        f"{body}{_caption(s)}</div>"
        f'<figure class="side">{blocks_svg(s.block_scores)}<figcaption>score per block</figcaption></figure>'
        "</div></article>"
    )


def _cards(q: Query, rows: list[Shown], kind: str) -> str:
    return "".join(card_html(s, f"q{q.index}-{kind}{abs(s.rank)}") for s in rows)


def query_html(q: Query) -> str:
    """The section of one query, anchored at ``q-<query_index>``."""
    p = math.exp(q.logp) if q.logp < 700 else math.inf
    marks = [s.score for s in q.positive + q.negative]
    parts = [
        f'<section class="query" id="q-{q.index}">',
        f'<h2>Query <span class="qid">{escape(q.id)}</span> <a class="back" href="#index" title="back to the index">↑ index</a></h2>',
        f'<pre class="qa"><span class="prompt">{escape(q.prompt)}</span>'
        f'<mark class="completion">{escape(q.completion)}</mark></pre>',
        '<p class="stats">'
        f"log p(completion | prompt) = <b>{q.logp:.3f}</b> (p = {escape(fmt(p))}) · "
        f"{q.num_scored:,} sequences scored · mean {escape(fmt(q.mean, True))} ± {escape(fmt(q.std))} · "
        f"min {escape(fmt(q.min, True))} · max {escape(fmt(q.max, True))}</p>",
        f'<figure class="dist">{histogram_svg(q.hist_edges, q.hist_counts, marks)}'
        "<figcaption>Distribution of scores over all scored sequences (dashed: zero).</figcaption></figure>",
    ]
    if q.positive:
        parts.append(f"<h3>Most positive influence <span class=\"n\">top {len(q.positive)}</span></h3>")
        parts.append(f'<div class="cards positive">{_cards(q, q.positive, "p")}</div>')
    else:
        parts.append('<p class="note">No positively ranked sequences in top.parquet for this query.</p>')
    if q.negative:
        parts.append(
            '<details class="negative"><summary>Most negative influence '
            f'<span class="n">top {len(q.negative)}</span></summary>'
            f'<div class="cards">{_cards(q, q.negative, "n")}</div></details>'
        )
    parts.append("</section>")
    return "".join(parts)
