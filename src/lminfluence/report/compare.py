"""Side by side: two queries of one group (a fact in two word orders, one question in two languages).

The most positive sequences of both queries in one table, a row per sequence, so
a sequence both rank high is one row with its two ranks and scores and their
differences. A sequence shown for only one query gets its rank and score in the
other from the scan (scores/matrix.parquet), in italics.
"""

from __future__ import annotations

import re
from html import escape

from .load import Card, Query, Run, groups
from .numbers import column_format, percent

Position = tuple[int, float, bool, str | None]  # rank, score, from the scan?, card anchor


def group_anchor(group: str, number: int) -> str:
    return f"g{number}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", group)[:40]


def group_anchors(run: Run) -> dict[str, str]:
    """Query id → the HTML id of the side-by-side view of its group (for groups of two or more queries)."""
    return {g: group_anchor(g, i) for i, g in enumerate(groups(run.queries))}


def _label(q: Query) -> str:
    lang = f" ({escape(q.language)})" if q.language else ""
    return f'<a href="#q-{q.index}">{escape(q.id)}</a>{lang}'


def _position(run: Run, q: Query, seq: int, shown: dict[int, Card]) -> Position | None:
    card = shown.get(seq)
    if card is not None:
        return card.rank, card.score, False, f"q{q.index}-p{card.rank}"
    scan = run.scan.get((q.index, seq))
    return None if scan is None else (scan[0], scan[1], True, None)


def pair_html(run: Run, a: Query, b: Query) -> str:
    """The aligned table of the positive shown sequences of ``a`` and ``b``."""
    shown_a = {c.seq_index: c for c in a.positive}
    shown_b = {c.seq_index: c for c in b.positive}
    doc = {c.seq_index: c for c in a.positive + b.positive}
    seqs = [c.seq_index for c in a.positive] + [c.seq_index for c in b.positive if c.seq_index not in shown_a]
    rows = [(s, _position(run, a, s, shown_a), _position(run, b, s, shown_b)) for s in seqs]
    fmt = column_format([p[1] for _, pa, pb in rows for p in (pa, pb) if p is not None])
    delta_fmt = column_format([pb[1] - pa[1] for _, pa, pb in rows if pa and pb])

    def cell(p: Position | None) -> str:
        if p is None:
            return '<td class="num">n/a</td><td class="num">n/a</td>'
        cls = "num scan" if p[2] else "num"
        rank = f'<a href="#{p[3]}">{p[0]}</a>' if p[3] else f"{p[0]:,}"
        return f'<td class="{cls}">{rank}</td><td class="{cls} {"pos" if p[1] >= 0 else "neg"}">{fmt(p[1], True)}</td>'

    body = []
    for s, pa, pb in rows:
        both = s in shown_a and s in shown_b
        d_rank = f"{pb[0] - pa[0]:+d}" if pa and pb else "n/a"
        d_score = delta_fmt(pb[1] - pa[1], True) if pa and pb else "n/a"
        c = doc[s]
        body.append(
            f'<tr class="{"shared" if both else ""}"><td class="doc">{escape(c.doc_id)} · {c.chunk}</td>'
            f'{cell(pa)}{cell(pb)}<td class="num">{d_rank}</td><td class="num">{d_score}</td></tr>'
        )
    shared = len(set(shown_a) & set(shown_b))
    return (
        f'<h4>{_label(a)} and {_label(b)}</h4>'
        f'<p class="stats">{shared} of the {len(a.positive)} and {len(b.positive)} most positive sequences are shared (highlighted).</p>'
        '<div class="scroll"><table class="compare"><thead>'
        '<tr><th rowspan="2">document · chunk</th>'
        f'<th colspan="2">{escape(a.id)}</th><th colspan="2">{escape(b.id)}</th><th colspan="2">change, {escape(a.id)} to {escape(b.id)}</th></tr>'
        "<tr><th>rank</th><th>score</th><th>rank</th><th>score</th><th>rank</th><th>score</th></tr>"
        f"</thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _crosslingual(rows: list[dict]) -> str:
    if not rows:
        return ""
    cells = "".join(
        f"<tr><td>{escape(r['language_from'])} → {escape(r['language_to'])}</td><td class=\"num\">{percent(r['captured'])}</td>"
        f"<td class=\"num\">{percent(r['overlap'])}</td><td class=\"num\">{r['spearman']:.2f}</td></tr>"
        for r in rows
    )
    k = rows[0]["k"]
    return (
        "<p class=\"stats\">Across languages (analysis/crosslingual.parquet): <i>captured</i> is how much of the second "
        f"language's top-{k} influence the first language's top {k} sequences carry; <i>overlap</i> the share of top-{k} "
        "sequences in common; Spearman over the union of both top sets.</p>"
        '<div class="scroll"><table class="compare small"><thead><tr><th>languages</th><th>captured</th><th>overlap</th>'
        f"<th>Spearman</th></tr></thead><tbody>{cells}</tbody></table></div>"
    )


def compare_html(run: Run) -> str:
    """A section per group of queries: its first query side by side with each other one."""
    anchors = group_anchors(run)
    if not anchors:
        return ""
    parts = [
        ('<section id="compare" class="compare"><h2>Queries side by side</h2>'
        '<p class="note">Queries that share a <code>group</code> (queries.parquet). Ranks and scores in italics come from the '
        "scan (scores/matrix.parquet): the sequence is not among that query's shown ones. Linked ranks open the card.</p>")
    ]
    for g, qs in groups(run.queries).items():
        parts.append(f'<div class="group" id="{anchors[g]}"><h3 class="group-name">Group {escape(g)}</h3>')
        parts.extend(pair_html(run, qs[0], other) for other in qs[1:])
        parts.append(_crosslingual(run.analysis.crosslingual.get(g, [])))
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


__all__ = ["compare_html", "group_anchors", "pair_html"]
