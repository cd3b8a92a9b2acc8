"""Score tables as Parquet (docs/run-directory.md has every column): one builder per table.

Each builder returns a ``pyarrow.Table``; ``write_tables`` writes them atomically,
queries.parquet last as the mark that the set is complete.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.readers import Query
from ..corpus.sequences import SequenceStore
from ..storage import layout
from ..storage.atomic import atomic_write

HIST_BINS = 40
_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_of(layer: str) -> int:
    """The transformer block number in a module name (model.layers.5.mlp.up_proj → 5), -1 if none."""
    m = _BLOCK.search(layer)
    return int(m.group(1)) if m else -1


def token_texts(tokenizer: Any, texts: Sequence[str], ids: Sequence[Sequence[int]]) -> list[list[str]]:
    """Each token's piece of its sequence's text, cut at the tokenizer's character offsets.

    The pieces of a sequence concatenate to its text exactly, so no character is
    lost or replaced (decoding each token alone breaks every character that
    byte-level BPE splits over several tokens). Token i gets the text from the
    end of token i-1 to its own end: a leading space stays with its token, and
    of the tokens sharing one character the first gets it and the others "".
    Tokens without text (a BOS prefix) get "".

    The text is tokenized again with offsets. Where that gives other ids than
    the stored ones (a sequence cut inside a word or inside a character
    tokenizes differently alone), the two id lists are aligned and a run of
    stored tokens without a match shares the text up to the next matched token:
    the first of the run gets it all, the rest "".

    Args:
        tokenizer: a fast (Rust) Hugging Face tokenizer, the one that cut the corpus.
        texts: the sequences' texts.
        ids: the sequences' stored token ids, aligned with ``texts``.
    """
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [
        _pieces(text, [int(t) for t in stored], list(again), [end for _, end in offsets])
        for text, stored, again, offsets in zip(texts, ids, enc["input_ids"], enc["offset_mapping"])
    ]


def _pieces(text: str, stored: list[int], again: list[int], again_ends: list[int]) -> list[str]:
    n = len(stored)
    if n == 0:
        return []
    if stored == again:
        ends = np.asarray(again_ends, dtype=np.int64)
    else:  # align the two id lists; stored tokens without a match share the text up to the next match
        ends = np.empty(n, dtype=np.int64)
        done = 0
        for a, b, size in difflib.SequenceMatcher(a=stored, b=again, autojunk=False).get_matching_blocks():
            ends[done:a] = again_ends[b - 1] if b > 0 else 0  # the unmatched run before this block: all to its first token
            ends[a : a + size] = again_ends[b : b + size]
            done = a + size
    ends = np.maximum.accumulate(np.clip(ends, 0, len(text)))
    ends[-1] = len(text)
    starts = np.r_[0, ends[:-1]]
    return [text[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def _write(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _rows(shown: Sequence[Any], union: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query index, position in its Shown, column of the union, seq_index) of every shown row, in table order."""
    if not shown:
        return (np.zeros(0, np.int64),) * 4
    q = np.concatenate([np.full(len(sh.indices), i, dtype=np.int64) for i, sh in enumerate(shown)])
    j = np.concatenate([np.arange(len(sh.indices), dtype=np.int64) for sh in shown])
    col = np.concatenate([np.asarray(sh.indices, dtype=np.int64) for sh in shown])
    return q, j, col, union[col].astype(np.int64)


def top_table(queries, first, shown, tfidf, union, store, blocks_of_layers):
    """scores/top.parquet: one row per (query, shown sequence)."""
    import pyarrow as pa

    q, j, col, seq = _rows(shown, union)
    layer_names = list(shown[0].per_layer) if shown else []
    blocks = sorted(set(blocks_of_layers.values()))
    block_scores = []
    for qi, ji in zip(q.tolist(), j.tolist()):
        per_block = dict.fromkeys(blocks, 0.0)
        for name in layer_names:
            per_block[blocks_of_layers[name]] += float(shown[qi].per_layer[name][ji])
        block_scores.append([per_block[b] for b in blocks])
    return pa.table({
        "query_index": pa.array(q),
        "query_id": pa.array([queries[i].id for i in q.tolist()], pa.string()),
        "rank": pa.array(np.array([shown[a].ranks[b] for a, b in zip(q, j)], dtype=np.int32)),
        "seq_index": pa.array(seq),
        "doc_id": pa.array([store.doc_id[s] for s in seq.tolist()], pa.string()),
        "chunk": pa.array(store.chunk[seq].astype(np.int32)),
        "char_start": pa.array(store.char_start[seq].astype(np.int64)),
        "char_end": pa.array(store.char_end[seq].astype(np.int64)),
        "score": pa.array(np.array([shown[a].total[b] for a, b in zip(q, j)], dtype=np.float64)),
        "first_stage_score": pa.array(first[q, col].astype(np.float64)),
        "tfidf": pa.nulls(len(q), pa.float64()) if tfidf is None else pa.array(tfidf[q, col].astype(np.float64)),
        "block_scores": pa.array(block_scores, pa.list_(pa.float64())),
        "text": pa.array([store.text[s] for s in seq.tolist()], pa.string()),
    })  # fmt: skip


def layers_table(shown, union, blocks_of_layers):
    """scores/layers.parquet: one row per (query, shown sequence, tracked layer)."""
    import pyarrow as pa

    q, j, _, seq = _rows(shown, union)
    names = list(shown[0].per_layer) if shown else []
    L = len(names)
    values = np.array([[float(shown[a].per_layer[n][b]) for n in names] for a, b in zip(q, j)], dtype=np.float64).reshape(-1)
    return pa.table({
        "query_index": pa.array(np.repeat(q, L)),
        "seq_index": pa.array(np.repeat(seq, L)),
        "layer": pa.array(names * len(q), pa.string()),
        "block": pa.array(np.tile(np.array([blocks_of_layers[n] for n in names], dtype=np.int32), len(q))),
        "score": pa.array(values),
    })  # fmt: skip


def tokens_table(shown, union, store, tokenizer):
    """scores/tokens.parquet: one row per (query, shown sequence, token); token = its piece of the text."""
    import pyarrow as pa

    q, j, _, seq = _rows(shown, union)
    unique = sorted(set(seq.tolist()))
    pieces = dict(zip(unique, token_texts(tokenizer, [store.text[s] for s in unique], [store.tokens(s) for s in unique])))
    cols: dict[str, list] = {k: [] for k in ("query_index", "seq_index", "position", "token_id", "score")}
    text: list[str] = []
    for qi, ji, s in zip(q.tolist(), j.tolist(), seq.tolist()):
        ids = store.tokens(s)
        n = len(ids)
        scores = np.zeros(n)
        m = min(n, shown[qi].per_token.shape[1])
        scores[:m] = shown[qi].per_token[ji, :m]
        cols["query_index"].append(np.full(n, qi, dtype=np.int64))
        cols["seq_index"].append(np.full(n, s, dtype=np.int64))
        cols["position"].append(np.arange(n, dtype=np.int32))
        cols["token_id"].append(ids.astype(np.int32))
        cols["score"].append(scores)
        text.extend(pieces[s])

    def cat(key: str, dtype) -> np.ndarray:
        return np.concatenate(cols[key]) if cols[key] else np.zeros(0, dtype)

    return pa.table({
        "query_index": pa.array(cat("query_index", np.int64)),
        "seq_index": pa.array(cat("seq_index", np.int64)),
        "position": pa.array(cat("position", np.int32)),
        "token_id": pa.array(cat("token_id", np.int32)),
        "token": pa.array(text, pa.string()),
        "score": pa.array(cat("score", np.float64)),
    })  # fmt: skip


def matrix_table(first, union):
    """scores/matrix.parquet: every scored (query, sequence) pair with its scan score."""
    import pyarrow as pa

    qi, ci = np.nonzero(np.isfinite(first))
    return pa.table({"query_index": qi.astype(np.int64), "seq_index": union[ci].astype(np.int64), "score": first[qi, ci].astype(np.float32)})


def queries_table(queries, logp, first):
    """scores/queries.parquet: one row per query, with the histogram and moments of its scan scores."""
    import pyarrow as pa

    hists, moments = [], []
    for q in range(len(queries)):
        row = first[q][np.isfinite(first[q])]  # the scan's scores: one estimator for every sequence
        counts, edges = np.histogram(row, bins=HIST_BINS)
        hists.append((edges.tolist(), counts.astype(np.int64).tolist()))
        moments.append((row.size, row.mean(), row.std(), row.min(), row.max()))
    size, mean, std, lo, hi = (np.array(c) for c in zip(*moments)) if moments else (np.zeros(0),) * 5
    return pa.table({
        "query_index": pa.array(np.arange(len(queries), dtype=np.int64)),
        "query_id": pa.array([q.id for q in queries], pa.string()),
        "group": pa.array([q.group for q in queries], pa.string()),
        "language": pa.array([q.language for q in queries], pa.string()),
        "prompt": pa.array([q.prompt for q in queries], pa.string()),
        "completion": pa.array([q.completion for q in queries], pa.string()),
        "logp": pa.array(np.asarray(logp, dtype=np.float64)),
        "num_scored": pa.array(np.asarray(size, dtype=np.int64)),
        "hist_edges": pa.array([h[0] for h in hists], pa.list_(pa.float64())),
        "hist_counts": pa.array([h[1] for h in hists], pa.list_(pa.int64())),
        "score_mean": pa.array(np.asarray(mean, dtype=np.float64)),
        "score_std": pa.array(np.asarray(std, dtype=np.float64)),
        "score_min": pa.array(np.asarray(lo, dtype=np.float64)),
        "score_max": pa.array(np.asarray(hi, dtype=np.float64)),
    })  # fmt: skip


def write_tables(
    run_dir: Path,
    queries: Sequence[Query],
    logp: np.ndarray,
    first: np.ndarray,
    shown: Sequence[Any],
    tfidf: np.ndarray | None,
    union: np.ndarray,
    store: SequenceStore,
    tokenizer: Any,
    save_matrix: bool,
) -> None:
    """Write queries, top, layers, tokens (and matrix) tables; queries.parquet last, as the completion mark.

    Args:
        run_dir: the run directory.
        queries: the Q queries, in query_index order.
        logp: [Q] log p(completion | prompt).
        first: [Q, U] scan scores against the union of candidates (NaN: not a candidate of that query).
        shown: one ``Shown`` per query (workflow.scoring): the shown sequences' columns, ranks and details.
        tfidf: [Q, U] TF-IDF scores, or None without candidate filtering.
        union: [U] sorted seq_index of the scanned sequences.
        store: the tokenized corpus.
        tokenizer: the tokenizer that cut the corpus (token texts come from its offsets).
        save_matrix: also write matrix.parquet.
    """
    scores_dir = run_dir / layout.SCORES_DIR
    scores_dir.mkdir(parents=True, exist_ok=True)
    blocks_of_layers = {name: block_of(name) for name in (shown[0].per_layer if shown else {})}
    _write(run_dir / layout.TOP_TABLE, top_table(queries, first, shown, tfidf, union, store, blocks_of_layers))
    _write(run_dir / layout.LAYERS_TABLE, layers_table(shown, union, blocks_of_layers))
    _write(run_dir / layout.TOKENS_TABLE, tokens_table(shown, union, store, tokenizer))
    if save_matrix:
        _write(run_dir / layout.MATRIX_TABLE, matrix_table(first, union))
    _write(run_dir / layout.QUERIES_TABLE, queries_table(queries, logp, first))


__all__ = ["HIST_BINS", "block_of", "token_texts", "write_tables"]
