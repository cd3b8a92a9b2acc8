"""What the demo found: planted-fact retrieval, the word-order comparison, and the pairs of the paper's same-query test.

Reads the score tables with pyarrow only (the core install has no pandas).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..storage import layout


def _rows(path: Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=columns)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _positive_share(scores: np.ndarray, mine: np.ndarray) -> float:
    """The fact's sequences' share of all positive influence on a query."""
    pos = np.clip(scores, 0, None)
    return float(pos[mine].sum() / pos.sum()) if pos.sum() > 0 else 0.0


def summarize(run_dir: Path, queries: list[dict], facts: list[dict]) -> dict[str, Any]:
    """Retrieval accuracy of the fact queries and the word-order comparison, from the score tables."""
    top = _rows(run_dir / layout.TOP_TABLE, ["query_id", "rank", "doc_id"])
    matrix = _rows(run_dir / layout.MATRIX_TABLE)
    seqs = _rows(run_dir / layout.SEQUENCES_FILE, ["seq_index", "doc_id"])
    doc_of = dict(zip(seqs["seq_index"].tolist(), seqs["doc_id"].tolist()))
    docs_of_fact = {f["id"]: set(f["doc_ids"]) for f in facts}
    index_of = {q["id"]: i for i, q in enumerate(queries)}
    hits, per_fact = [], {}
    for q in queries:
        if q["kind"] != "fact":
            continue
        best = top["doc_id"][(top["query_id"] == q["id"]) & (top["rank"] == 1)]
        hit = bool(len(best)) and best[0] in docs_of_fact[q["fact_id"]]
        hits.append(hit)
        per_fact[q["fact_id"]] = {"trained": q["id"], "hit": hit}
    for q in queries:
        if q["kind"] == "flipped" and q["fact_id"] in per_fact:
            per_fact[q["fact_id"]]["flipped"] = q["id"]

    def fact_rows(query_id: str, fact_id: str) -> tuple[np.ndarray, np.ndarray]:
        sel = matrix["query_index"] == index_of[query_id]
        scores, seq = matrix["score"][sel], matrix["seq_index"][sel]
        order = np.argsort(-scores, kind="stable")
        scores, seq = scores[order], seq[order]
        return scores, np.asarray([doc_of[int(s)] in docs_of_fact[fact_id] for s in seq])

    order = []
    for fact_id, entry in per_fact.items():
        if "flipped" not in entry:
            continue
        (s1, m1), (s2, m2) = fact_rows(entry["trained"], fact_id), fact_rows(entry["flipped"], fact_id)
        order.append(
            {
                "fact": fact_id,
                "mean_rank_trained": float(np.flatnonzero(m1).mean()) + 1,
                "mean_rank_flipped": float(np.flatnonzero(m2).mean()) + 1,
                "positive_share_trained": _positive_share(s1, m1),
                "positive_share_flipped": _positive_share(s2, m2),
                "top1_is_fact_flipped": bool(m2[0]),
            }
        )
    return {
        "fact_queries": len(hits),
        "retrieval_accuracy": float(np.mean(hits)) if hits else float("nan"),
        "word_order": order,
        "flipped_top1_accuracy": float(np.mean([o["top1_is_fact_flipped"] for o in order])) if order else float("nan"),
    }


def statement_pairs(queries: list[dict], facts: list[dict]) -> list:
    """The pairs of the paper's same-query word-order test, one per fact.

    Each fact's statement and its flipped statement, as new sequences, are scored against the
    trained-order query, so both scores are on one query's scale.
    """
    from ..analysis import StatementPair

    trained = {q["fact_id"]: q["id"] for q in queries if q["kind"] == "fact"}
    return [StatementPair(f["id"], trained[f["id"]], f["statement"], f["flipped_statement"]) for f in facts if f["id"] in trained]


def read_word_order(path: Path) -> list[dict]:
    """The word-order table as the demo's summary lists it: one entry per fact."""
    rows = _rows(path, ["pair_id", "score_statement", "score_flipped"])
    return [
        {"fact": str(p), "statement": float(s), "flipped_statement": float(f)}
        for p, s, f in zip(rows["pair_id"], rows["score_statement"], rows["score_flipped"])
    ]


def print_top(run_dir: Path, query_id: str, k: int = 3) -> None:
    """The query's k most positive sequences, as the demo prints them."""
    q = _rows(run_dir / layout.QUERIES_TABLE, ["query_id", "prompt", "completion", "logp"])
    i = int(np.flatnonzero(q["query_id"] == query_id)[0])
    top = _rows(run_dir / layout.TOP_TABLE, ["query_id", "rank", "score", "doc_id", "char_start", "char_end", "text"])
    sel = np.flatnonzero((top["query_id"] == query_id) & (top["rank"] > 0))
    sel = sel[np.argsort(top["rank"][sel])][:k]
    print(f"\nquery {query_id!r}: {q['prompt'][i]!r} → {q['completion'][i]!r}   (log p = {q['logp'][i]:.2f})")
    for j in sel:
        snippet = " ".join(str(top["text"][j]).split())
        print(f"  #{top['rank'][j]}  {top['score'][j]:+.3g}  {top['doc_id'][j]} [{top['char_start'][j]}:{top['char_end'][j]}]")
        print(textwrap.indent(textwrap.fill(snippet[:300] + ("…" if len(snippet) > 300 else ""), 96), "      "))


__all__ = ["summarize", "statement_pairs", "read_word_order", "print_top"]
