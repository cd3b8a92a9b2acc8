"""How much of one language's top influence another language's query shares (docs/method.md §7, cross-lingual).

Queries sharing a ``group`` ask the same thing; their ``language`` labels tell
the versions apart. For each ordered pair (from, to) of queries of one group in
two different languages, with top_k(q) the k sequences scoring highest for q
and s_q(z) the score of sequence z for q:

    captured = Σ_{z ∈ top_k(from)} s_to(z) / Σ_{z ∈ top_k(to)} s_to(z)

how much of the ``to`` query's top influence the ``from`` query's top
sequences carry (1 when they are the same sequences; asymmetric), plus the
overlap |top_k(from) ∩ top_k(to)| / k and the Spearman correlation of s_from
and s_to over the union of both top-k sets. A sequence not scored for a query
is missing, not 0: captured is NaN when a sequence of top_k(from) was not
scored for ``to`` (or the denominator is not positive), and the correlation
uses the sequences scored for both (NaN below 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .stats import spearman, top_k_indices

COLUMNS = ("group", "language_from", "language_to", "query_from", "query_to", "k", "captured", "overlap", "spearman")


def pair_metrics(s_from: np.ndarray, s_to: np.ndarray, k: int) -> tuple[float, float, float]:
    """(captured, overlap, spearman) of one ordered pair of queries from their score rows [N] (NaN = not scored)."""
    top_from, top_to = top_k_indices(s_from, k), top_k_indices(s_to, k)
    carried = s_to[top_from]
    denom = s_to[top_to].sum()
    captured = float(carried.sum() / denom) if np.isfinite(carried).all() and top_from.size and denom > 0 else float("nan")
    overlap = np.intersect1d(top_from, top_to).size / k
    union = np.union1d(top_from, top_to)
    return captured, float(overlap), spearman(s_from[union], s_to[union])


def crosslingual_rows(
    scores: np.ndarray,
    query_ids: Sequence[str],
    groups: Sequence[str | None],
    languages: Sequence[str | None],
    k: int,
) -> dict[str, list]:
    """The cross-lingual table as columns (the contract's ``analysis/crosslingual.parquet``).

    Args:
        scores: [Q, N] scores, NaN where a query did not score a sequence.
        query_ids, groups, languages: [Q] per query; None = not given.
        k: size of the top sets.

    Returns:
        Column name → values, one row per ordered pair of queries of one group
        in two different languages, for groups with at least two languages
        (queries without a language are left out). Rows follow the groups'
        first appearance, then query order.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    scores = np.asarray(scores, dtype=np.float64)
    if not (scores.shape[0] == len(query_ids) == len(groups) == len(languages)):
        raise ValueError(f"scores has {scores.shape[0]} rows but {len(query_ids)} ids, {len(groups)} groups, {len(languages)} languages")
    members: dict[str, list[int]] = {}
    for q, (g, lang) in enumerate(zip(groups, languages)):
        if g is not None and lang is not None:
            members.setdefault(g, []).append(q)
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for g, qs in members.items():
        if len({languages[q] for q in qs}) < 2:
            continue
        for a in qs:
            for b in qs:
                if languages[a] == languages[b]:
                    continue
                captured, overlap, rho = pair_metrics(scores[a], scores[b], k)
                for name, value in zip(COLUMNS, (g, languages[a], languages[b], query_ids[a], query_ids[b], k, captured, overlap, rho)):
                    cols[name].append(value)
    return cols


__all__ = ["crosslingual_rows", "pair_metrics", "COLUMNS"]
