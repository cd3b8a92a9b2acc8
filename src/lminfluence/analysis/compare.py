"""Comparing two runs (two models on the same corpus and queries), as the paper compares model sizes.

Queries are matched by ``query_id``. When both runs cut the corpus into the
same sequences (the same document id and character span for every sequence
index) the comparison is per sequence. When their tokenizers cut it
differently, sequences are not comparable and the comparison is per document:
a document's score for a query is the **largest score of its sequences**
scored for that query (the document's most helpful piece; a document none of
whose sequences was scored is missing). Per query:

- spearman: rank correlation over the units both runs scored (NaN below 3);
- overlap: |top_k(A) ∩ top_k(B)| / k, each run's top k among the units it scored.

Scores are the first-stage scores of ``scores/matrix.parquet`` (every scored pair).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..corpus.readers import InputError
from ..storage import layout
from .files import load_scores, read_columns, require
from .stats import spearman, top_k_indices


def same_sequences(seqs_a: dict, seqs_b: dict) -> bool:
    """Whether two sequences.parquet tables cut the corpus identically (doc id and character span per index)."""
    if len(seqs_a["doc_id"]) != len(seqs_b["doc_id"]):
        return False
    order_a, order_b = np.argsort(seqs_a["seq_index"]), np.argsort(seqs_b["seq_index"])
    return (
        np.array_equal(seqs_a["seq_index"][order_a], seqs_b["seq_index"][order_b])
        and [seqs_a["doc_id"][i] for i in order_a] == [seqs_b["doc_id"][i] for i in order_b]
        and np.array_equal(seqs_a["char_start"][order_a], seqs_b["char_start"][order_b])
        and np.array_equal(seqs_a["char_end"][order_a], seqs_b["char_end"][order_b])
    )


def max_per_document(scores: np.ndarray, doc_codes: np.ndarray, num_docs: int) -> np.ndarray:
    """[Q, D] the largest score of each document's sequences per query (NaN = none of them scored).

    Args:
        scores: [Q, U] sequence scores, NaN = not scored.
        doc_codes: [U] the document (0..D-1) of each column.
    """
    Q, U = scores.shape
    out = np.full((Q, num_docs), np.nan)
    rows = np.repeat(np.arange(Q), U)
    np.fmax.at(out, (rows, np.tile(doc_codes, Q)), scores.ravel())  # fmax: a NaN loses to any number
    return out


def compare_scores(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of two aligned [Q, M] score arrays (NaN = not scored): Spearman, top-k overlap, units scored by both."""
    rho = np.array([spearman(a[q], b[q]) for q in range(a.shape[0])])
    overlap = np.array([np.intersect1d(top_k_indices(a[q], k), top_k_indices(b[q], k)).size / k for q in range(a.shape[0])])
    common = (np.isfinite(a) & np.isfinite(b)).sum(axis=1)
    return rho, overlap, common


def _aligned(run: Path, query_ids: list[str]):
    """A run's scores for ``query_ids`` [Q, U], its sequence indices [U] and its sequences table."""
    queries, scores, columns = load_scores(run)
    row_of = {qid: i for i, qid in enumerate(queries["query_id"])}
    seqs = read_columns(require(run, layout.SEQUENCES_FILE, "it is not a fitted run directory"), ["seq_index", "doc_id", "char_start", "char_end"])
    return scores[[row_of[q] for q in query_ids]], columns, seqs


def compare_runs(run_a: str | Path, run_b: str | Path, k: int = 10):
    """Rank correlation and top-k overlap per shared query between two runs over the same corpus.

    Args:
        run_a, run_b: scored run directories (their ``scores/matrix.parquet`` is read).
        k: size of the top sets compared.

    Returns:
        A pyarrow Table, one row per query id present in both runs (in run A's
        order): query_id, unit ("sequence" or "document"), k, num_a and num_b
        (units each run scored), num_common (scored by both), spearman, overlap.
    """
    import pyarrow as pa

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ids_a = read_columns(require(Path(run_a), layout.QUERIES_TABLE), ["query_id"])["query_id"]
    ids_b = set(read_columns(require(Path(run_b), layout.QUERIES_TABLE), ["query_id"])["query_id"])
    shared = [q for q in ids_a if q in ids_b]
    if not shared:
        raise InputError(f"{run_a} and {run_b} share no query id; score the same queries file in both runs")
    sa, cols_a, seqs_a = _aligned(Path(run_a), shared)
    sb, cols_b, seqs_b = _aligned(Path(run_b), shared)
    if same_sequences(seqs_a, seqs_b):
        unit = "sequence"
        items = np.union1d(cols_a, cols_b)
        a = np.full((len(shared), items.size), np.nan)
        b = np.full_like(a, np.nan)
        a[:, np.searchsorted(items, cols_a)] = sa
        b[:, np.searchsorted(items, cols_b)] = sb
    else:
        unit = "document"
        doc_a = dict(zip(seqs_a["seq_index"].tolist(), seqs_a["doc_id"]))
        doc_b = dict(zip(seqs_b["seq_index"].tolist(), seqs_b["doc_id"]))
        docs = sorted({doc_a[int(s)] for s in cols_a} | {doc_b[int(s)] for s in cols_b})
        code = {d: i for i, d in enumerate(docs)}
        a = max_per_document(sa, np.array([code[doc_a[int(s)]] for s in cols_a], dtype=np.int64), len(docs))
        b = max_per_document(sb, np.array([code[doc_b[int(s)]] for s in cols_b], dtype=np.int64), len(docs))
    rho, overlap, common = compare_scores(a, b, k)
    n = len(shared)
    return pa.table(
        {
            "query_id": pa.array(shared, pa.string()),
            "unit": pa.array([unit] * n, pa.string()),
            "k": pa.array([k] * n, pa.int32()),
            "num_a": pa.array(np.isfinite(a).sum(axis=1), pa.int64()),
            "num_b": pa.array(np.isfinite(b).sum(axis=1), pa.int64()),
            "num_common": pa.array(common, pa.int64()),
            "spearman": pa.array(rho, pa.float64()),
            "overlap": pa.array(overlap, pa.float64()),
        }
    )


__all__ = ["compare_runs", "compare_scores", "max_per_document", "same_sequences"]
