"""One query's section of the report: prompt and completion, charts, and the heads of its sequence cards.

A card's head (rank, score, provenance, badges) is static HTML, so the scores read
without JavaScript; its body (the token heatmap and the per-block bars) is drawn
by the page's script from the embedded data when the card comes into view.
"""

from __future__ import annotations

import math
from html import escape

from .analysis_tables import ANALYZER
from .load import Card, Query, Run
from .numbers import Format, column_format, number
from .plots import histogram_svg, layers_svg, rank_svg, sparsity_caption, thirds_caption


def card_id(q: Query, card: Card) -> str:
    """The HTML id of a card (links from the index and the side-by-side view point at it)."""
    return f"q{q.index}-{'p' if card.rank > 0 else 'n'}{abs(card.rank)}"


def card_html(q: Query, card: Card, number_k: int, fmt: Format) -> str:
    """The card of one shown sequence: a static head and an empty body the script fills."""
    extra = []
    if not math.isclose(card.first_stage_score, card.score, rel_tol=1e-6, abs_tol=0.0):
        extra.append(f"scan {fmt(card.first_stage_score, True)}")
    if card.tfidf is not None:
        extra.append(f"tf-idf {number(card.tfidf)}")
    badge = ""
    if card.spurious:
        badge = (
            f'<span class="badge spurious" title="one token holds most of the influence: the paper\'s filter '
            f'‖a‖₂/‖a‖₁ &gt; 2/3 over the token scores a">spurious · ‖a‖₂/‖a‖₁ = {card.l2_l1:.2f}</span>'
        )
    return (  # kept short: a report holds thousands of these (the script adds the document button)
        f'<article class="card" id="{card_id(q, card)}" data-k="{number_k}"><header>'
        f'<b class="rank">#{abs(card.rank)}</b><b class="score {"pos" if card.score >= 0 else "neg"}">{fmt(card.score, True)}</b>'
        f'<span class="prov"><b>{escape(card.doc_id)}</b> · chunk {card.chunk} · chars {card.char_start}–{card.char_end}'
        f" · seq {card.seq_index}</span>{badge}"
        + (f'<span class="extra">{" · ".join(extra)}</span>' if extra else "")
        + "</header><div></div></article>"
    )


def _charts(run: Run, q: Query) -> str:
    marks = [c.first_stage_score for c in q.cards]
    figures = [
        (f'<figure>{histogram_svg(q.hist_edges, q.hist_counts, marks)}'
        f"<figcaption>Scan scores of all {q.num_scored:,} scored sequences (dashed: zero).</figcaption></figure>")
    ]
    sparsity = run.analysis.sparsity.get(q.index)
    if sparsity is not None:
        figures.append(f"<figure>{rank_svg(sparsity)}<figcaption>{sparsity_caption(sparsity)}</figcaption></figure>")
    shares = run.analysis.layer_shares.get(q.index)
    if shares:
        order = {name: i for i, (name, _) in enumerate(run.layers)}
        shares = sorted(shares, key=lambda s: (s[1], order.get(s[0], len(order))))
        thirds = run.analysis.thirds.get(q.index)
        caption = thirds_caption(thirds) if thirds else "Each tracked layer's share of the top sequences' influence."
        figures.append(f"<figure>{layers_svg(shares)}<figcaption>{escape(caption)}</figcaption></figure>")
    if sparsity is None and not shares:
        figures.append(f'<p class="note">Run <code>{ANALYZER}</code> for the rank plot, the concentration of influence and the layer profile.</p>')
    return f'<div class="charts">{"".join(figures)}</div>'


def query_html(run: Run, q: Query, numbers: dict[int, int], group_anchor: str | None) -> str:
    """The section of one query, anchored at ``q-<query_index>``."""
    fmt = column_format([c.score for c in q.cards] + [c.first_stage_score for c in q.cards])
    stats = column_format([q.min, q.max, q.mean, q.std])
    p = math.exp(q.logp) if q.logp < 700 else math.inf
    tags = " · ".join(escape(t) for t in (q.group, q.language) if t)
    links = '<a class="back" href="#index">↑ index</a>'
    if group_anchor:
        links += f' <a class="back" href="#{group_anchor}">compare in group {escape(q.group or "")}</a>'
    parts = [
        f'<section class="query" id="q-{q.index}">',
        f'<h2>Query <span class="qid">{escape(q.id)}</span>{f" <span class=tags>{tags}</span>" if tags else ""} {links}</h2>',
        f'<pre class="qa"><span class="prompt">{escape(q.prompt)}</span><mark class="completion">{escape(q.completion)}</mark></pre>',
        ('<p class="stats">'
        f"log p(completion | prompt) = <b>{q.logp:.3f}</b> (p = {number(p)}) · {q.num_scored:,} sequences scored · "
        f"mean {stats(q.mean, True)} ± {stats(q.std)} · min {stats(q.min, True)} · max {stats(q.max, True)}</p>"),
        _charts(run, q),
    ]
    if q.positive:
        parts.append(f'<h3>Most positive influence <span class="n">top {len(q.positive)}</span></h3>')
        parts.append(f'<div class="cards">{"".join(card_html(q, c, numbers[id(c)], fmt) for c in q.positive)}</div>')
    else:
        parts.append('<h3>Most positive influence</h3><p class="note">No sequence has a positive score for this query.</p>')
    if q.negative:
        parts.append(
            f'<details class="negative"><summary><h3>Most negative influence <span class="n">{len(q.negative)} sequences</span></h3></summary>'
            f'<div class="cards">{"".join(card_html(q, c, numbers[id(c)], fmt) for c in q.negative)}</div></details>'
        )
    else:
        parts.append('<h3>Most negative influence</h3><p class="note">No sequence has a negative score for this query.</p>')
    parts.append("</section>")
    return "".join(parts)


__all__ = ["card_html", "card_id", "query_html"]
