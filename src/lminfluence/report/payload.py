"""The data the page's script renders cards from: compact JSON, gzip-compressed, base85 in the page.

Each text is stored once: a document's chunks hold the texts, a shown sequence
refers to its chunk and adds its token lengths. Token scores are stored per card
as integers, ``round(score / peak * QUANT)`` with ``peak`` the card's largest
|token score| (so a shown value is exact to peak / (2 QUANT), finer than the 32
colour steps; tokens.parquet has the exact values); block scores keep three
significant digits. The gzip bytes are written in base85 (Python's alphabet with
"<" written as ".", so the data can never close its script element): 25 % larger
than the bytes, where base64 is 33 %. ``decode`` reads a page's data back (tests use it).

Layout of the JSON (every list positional, to stay small)::

    {"levels": LEVELS, "quant": QUANT, "peak": global max |token score|,
     "blockPeak": global max |block score|, "blocks": [block numbers, the order of every card's block scores],
     "queries": [[query peak, query block peak, [card numbers]], ...],     # by query position
     "cards": [[seq_index, query position, card peak, [int token scores], [block scores]], ...],
     "seqs": {seq_index: [document number, token lengths in UTF-16 code units (lengths_text)]},
     "docs": [[doc_id, [[seq_index, chunk, char_start, char_end, text], ...]], ...]}
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
from typing import Any

import numpy as np

from .colours import LEVELS
from .load import Run

QUANT = 255
ENCODING = "gzip+base85"


def utf16_length(text: str) -> int:
    """Length of ``text`` in UTF-16 code units, as JavaScript counts it."""
    return len(text.encode("utf-16-le")) // 2


def lengths_text(lengths: list[int]) -> str:
    """Token lengths as one character each, chr(48 + n) for n < 75 ("0" = 0, "1" = 1, …, "z" = 74), else "~n."."""
    return "".join(chr(48 + n) if n < 75 and n != 44 else f"~{n}." for n in lengths)  # 48 + 44 = "\\" would need escaping


def _peak(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def _quantise(scores: np.ndarray, peak: float) -> list[int | None]:
    if peak == 0:
        return [0 if math.isfinite(v) else None for v in scores.tolist()]
    q = np.round(scores / peak * QUANT)
    return [int(v) if math.isfinite(v) else None for v in q.tolist()]


def _round3(x: float) -> float:
    return float(f"{x:.3g}") if math.isfinite(x) else 0.0


def card_numbers(run: Run) -> dict[int, int]:
    """id(card) → its number in the payload: queries in order, each its positive then its negative cards."""
    out: dict[int, int] = {}
    for q in run.queries:
        for card in q.cards:
            out[id(card)] = len(out)
    return out


def build(run: Run) -> dict[str, Any]:
    """The payload of a run (see the module docstring)."""
    numbers = card_numbers(run)
    doc_number = {doc_id: i for i, doc_id in enumerate(sorted(run.documents))}
    seqs: dict[str, list[Any]] = {}
    cards: list[list[Any]] = [[] for _ in numbers]
    queries = []
    for qpos, q in enumerate(run.queries):
        for card in q.cards:
            seqs.setdefault(str(card.seq_index), [doc_number[card.doc_id], lengths_text([utf16_length(t) for t in card.tokens])])
            peak = _peak(card.token_scores)
            cards[numbers[id(card)]] = [card.seq_index, qpos, peak, _quantise(card.token_scores, peak), [_round3(b) for b in card.block_scores]]
        queries.append([
            max((cards[numbers[id(c)]][2] for c in q.cards), default=0.0),
            max((abs(b) for c in q.cards for b in c.block_scores), default=0.0),
            [numbers[id(c)] for c in q.cards],
        ])  # fmt: skip
    docs = [[doc_id, [[c.seq_index, c.chunk, c.char_start, c.char_end, c.text] for c in run.documents[doc_id]]] for doc_id in sorted(run.documents)]
    return {
        "levels": LEVELS,
        "quant": QUANT,
        "peak": max((c[2] for c in cards), default=0.0),
        "blockPeak": max((q[1] for q in queries), default=0.0),
        "blocks": sorted({block for _, block in run.layers}),
        "queries": queries,
        "cards": cards,
        "seqs": seqs,
        "docs": docs,
    }


def encode(payload: dict[str, Any]) -> str:
    """JSON → gzip (fixed mtime: the same run gives the same page) → base85, "<" written as "."."""
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return base64.b85encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii").replace("<", ".")


def decode(html: str) -> dict[str, Any]:
    """The payload of a report page."""
    m = re.search(r'<script type="application/octet-stream" id="data"[^>]*>([^<]*)</script>', html)
    if m is None:
        raise ValueError("no report data in this page")
    return json.loads(gzip.decompress(base64.b85decode(m.group(1).replace(".", "<"))).decode("utf-8"))


__all__ = ["ENCODING", "QUANT", "build", "card_numbers", "decode", "encode", "lengths_text", "utf16_length"]
