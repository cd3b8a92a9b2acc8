"""The paper's word-order test (docs/method.md §7): does a statement keep its influence when its order flips?

Each pair holds a statement in one word order ("The first President of the
Republic of Astrobia was Zorald Pfaff") and the same content flipped ("Zorald
Pfaff was the first President of the Republic of Astrobia"). Both are scored
as training sequences, cut like the corpus (the tokenizer's BOS in front when
it adds one, nothing else), against the pair's query, so both scores are on
one query's scale. ``kept`` = score_flipped / score_statement says how much
influence the flipped form keeps; the paper finds it near zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Execution, ScoreConfig
from ..corpus.readers import Document, InputError, Query, _existing, _field, _jsonl_rows

COLUMNS = ("pair_id", "query_id", "statement", "flipped", "score_statement", "score_flipped", "kept")


@dataclass(frozen=True)
class StatementPair:
    """A statement, the same statement in the flipped word order, and the id of the query to score them against."""

    pair_id: str
    query_id: str
    statement: str
    flipped: str


def read_pairs(path: str | Path) -> list[StatementPair]:
    """Pairs from JSON Lines with ``query_id``, ``statement``, ``flipped`` and optional ``id`` (default: the line number)."""
    p = _existing(path, "statement pairs file")
    pairs = []
    for lineno, row in _jsonl_rows(p):
        where = f"{p}:{lineno}"
        pairs.append(
            StatementPair(
                _field(row, "id", where, required=False) or str(lineno),
                _field(row, "query_id", where) or "",
                _field(row, "statement", where) or "",
                _field(row, "flipped", where) or "",
            )
        )
    return _checked(pairs, str(p))


def as_pairs(pairs: str | Path | Iterable[StatementPair | Mapping[str, Any]]) -> list[StatementPair]:
    """Pairs from a JSON Lines path, StatementPair objects or dicts with the same fields."""
    if isinstance(pairs, (str, Path)):
        return read_pairs(pairs)
    out = [p if isinstance(p, StatementPair) else StatementPair(**p) for p in pairs]
    return _checked(out, "statement pairs")


def _checked(pairs: list[StatementPair], where: str) -> list[StatementPair]:
    if not pairs:
        raise InputError(f"{where}: no statement pairs")
    ids = [p.pair_id for p in pairs]
    if len(set(ids)) != len(ids):
        raise InputError(f"{where}: pair id {next(i for i in ids if ids.count(i) > 1)!r} appears twice; ids must be unique")
    for p in pairs:
        if not p.statement.strip() or not p.flipped.strip():
            raise InputError(f"{where}: pair {p.pair_id!r} has an empty statement or flipped statement")
    return pairs


def statement_sequences(pairs: Sequence[StatementPair], tokenizer: Any, max_length: int):
    """Both forms of every pair as training sequences [2P] (statement, flipped, next pair...), one sequence each."""
    from ..corpus.sequences import SequenceStore

    docs = [Document(f"{p.pair_id}/{form}", text) for p in pairs for form, text in (("statement", p.statement), ("flipped", p.flipped))]
    store = SequenceStore.build(docs, tokenizer, max_length, progress=False)
    if store.doc_id != [d.id for d in docs]:
        counts = {d.id: store.doc_id.count(d.id) for d in docs}
        bad, c = next((d, c) for d, c in counts.items() if c != 1)
        why = "has fewer than 2 tokens" if c == 0 else f"is longer than the run's --max-length of {max_length} tokens (it makes {c} sequences)"
        raise InputError(f"statement {bad!r} {why}: each form must be one training sequence")
    return store


def score_word_order(
    model,
    tokenizer: Any,
    factors,
    queries: Sequence[Query],
    pairs: Sequence[StatementPair],
    *,
    max_length: int,
    config: ScoreConfig | None = None,
    execution: Execution = Execution(),
    task=None,
) -> dict[str, list]:
    """Score each pair's statement and flipped statement against its query (``lminfluence.compute_scores``).

    Args:
        model, tokenizer, factors: the run's model, its tokenizer and fitted factors.
        queries: the queries the pairs refer to by id.
        pairs: the statement pairs.
        max_length: the longest sequence (the run's ``--max-length``).
        config: damping (default: ``ScoreConfig()``, full rank).
        execution: batch sizes.
        task: the task (default: the causal-LM task).

    Returns:
        The contract's word_order columns, one row per pair.
    """
    from ..scoring.pairwise import compute_scores
    from ..workflow.scoring import query_examples

    by_id = {q.id: q for q in queries}
    missing = sorted({p.query_id for p in pairs} - set(by_id))
    if missing:
        raise InputError(f"statement pairs name unknown query id(s) {', '.join(map(repr, missing))}; known: {', '.join(map(repr, by_id))}")
    used = list(dict.fromkeys(p.query_id for p in pairs))  # distinct, in first-use order
    store = statement_sequences(pairs, tokenizer, max_length)
    examples = query_examples(tokenizer, [by_id[q] for q in used], model)
    scored = compute_scores(model, factors, examples, list(store), config or ScoreConfig(), task=task, execution=execution)
    scores = scored.total.double().cpu().numpy()  # [Qu, 2P]
    row = {q: i for i, q in enumerate(used)}
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for i, p in enumerate(pairs):
        s, f = float(scores[row[p.query_id], 2 * i]), float(scores[row[p.query_id], 2 * i + 1])
        for name, value in zip(COLUMNS, (p.pair_id, p.query_id, p.statement, p.flipped, s, f, f / s if s > 0 else float("nan"))):
            cols[name].append(value)
    return cols


def summarize_word_order(cols: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The word-order table summarised: num_pairs, median_kept and flipped_lower_share.

    median_kept is over the pairs whose statement scores > 0 (NaN if none); flipped_lower_share
    is the share of pairs where the flipped form scores lower.
    """
    s = np.asarray(cols["score_statement"], dtype=np.float64)
    f = np.asarray(cols["score_flipped"], dtype=np.float64)
    kept = np.asarray(cols["kept"], dtype=np.float64)
    kept = kept[np.isfinite(kept)]
    return {
        "num_pairs": int(s.size),
        "median_kept": float(np.median(kept)) if kept.size else float("nan"),
        "flipped_lower_share": float(np.mean(f < s)) if s.size else float("nan"),
    }


__all__ = ["StatementPair", "read_pairs", "as_pairs", "statement_sequences", "score_word_order", "summarize_word_order", "COLUMNS"]
