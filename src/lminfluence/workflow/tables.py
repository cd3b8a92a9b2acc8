"""Score tables as Parquet (docs/run-directory.md has every column)."""

from __future__ import annotations

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


class TokenText:
    """Each token's text as it appears in running text (leading spaces kept), cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.anchor = anchor[:1]
        self.anchor_text = tokenizer.decode(self.anchor) if self.anchor else ""

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            if self.anchor:  # decoding after a fixed token keeps the token's own leading space
                full = self.tokenizer.decode(self.anchor + [token_id], clean_up_tokenization_spaces=False)
                text = full[len(self.anchor_text) :] if full.startswith(self.anchor_text) else self.tokenizer.decode([token_id])
            else:
                text = self.tokenizer.decode([token_id])
            self.cache[token_id] = text
        return text


def _write(path: Path, table) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


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
    """Write queries, top, layers, tokens (and matrix) tables; queries.parquet last, as the completion mark."""
    import pyarrow as pa

    scores_dir = run_dir / layout.SCORES_DIR
    scores_dir.mkdir(parents=True, exist_ok=True)
    text_of = TokenText(tokenizer)
    layer_names = list(shown[0].per_layer) if shown else []
    blocks = sorted({block_of(n) for n in layer_names})
    top: dict[str, list] = {k: [] for k in ("query_index", "query_id", "rank", "seq_index", "doc_id", "chunk", "char_start", "char_end", "score", "first_stage_score", "tfidf", "block_scores", "text")}
    layers: dict[str, list] = {k: [] for k in ("query_index", "seq_index", "layer", "block", "score")}
    tokens: dict[str, list] = {k: [] for k in ("query_index", "seq_index", "position", "token_id", "token", "score")}
    col_of = {int(s): c for c, s in enumerate(union)}
    for q, sh in enumerate(shown):
        for j, col in enumerate(sh.indices):
            seq = int(union[col])
            top["query_index"].append(q)
            top["query_id"].append(queries[q].id)
            top["rank"].append(int(sh.ranks[j]))
            top["seq_index"].append(seq)
            top["doc_id"].append(store.doc_id[seq])
            top["chunk"].append(int(store.chunk[seq]))
            top["char_start"].append(int(store.char_start[seq]))
            top["char_end"].append(int(store.char_end[seq]))
            top["score"].append(float(sh.total[j]))
            top["first_stage_score"].append(float(first[q, col_of[seq]]))
            top["tfidf"].append(None if tfidf is None else float(tfidf[q, col_of[seq]]))
            per_block = {b: 0.0 for b in blocks}
            for name in layer_names:
                value = float(sh.per_layer[name][j])
                per_block[block_of(name)] += value
                layers["query_index"].append(q)
                layers["seq_index"].append(seq)
                layers["layer"].append(name)
                layers["block"].append(block_of(name))
                layers["score"].append(value)
            top["block_scores"].append([per_block[b] for b in blocks])
            top["text"].append(store.text[seq])
            ids = store.tokens(seq)
            n = len(ids)
            tokens["query_index"].append(np.full(n, q))
            tokens["seq_index"].append(np.full(n, seq))
            tokens["position"].append(np.arange(n))
            tokens["token_id"].append(ids)
            tokens["token"].extend(text_of(int(t)) for t in ids)
            scores = np.zeros(n)
            m = min(n, sh.per_token.shape[1])
            scores[:m] = sh.per_token[j, :m]
            tokens["score"].append(scores)
    for key in ("query_index", "seq_index", "position", "token_id", "score"):
        tokens[key] = np.concatenate(tokens[key]) if tokens[key] else np.zeros(0)
    int32 = {"rank", "chunk", "block", "position", "token_id"}

    def table(cols: dict[str, list], types: dict[str, Any] | None = None):
        types = types or {}
        return pa.table({k: pa.array(v, types.get(k, pa.int32() if k in int32 else None)) for k, v in cols.items()})

    _write(run_dir / layout.TOP_TABLE, table(top, {"tfidf": pa.float64(), "block_scores": pa.list_(pa.float64())}))
    _write(run_dir / layout.LAYERS_TABLE, table(layers))
    _write(run_dir / layout.TOKENS_TABLE, table(tokens, {"token": pa.string()}))
    if save_matrix:
        qi, ci = np.nonzero(np.isfinite(first))
        _write(
            run_dir / layout.MATRIX_TABLE,
            pa.table({"query_index": qi.astype(np.int64), "seq_index": union[ci].astype(np.int64), "score": first[qi, ci].astype(np.float32)}),
        )
    qt: dict[str, list] = {k: [] for k in ("query_index", "query_id", "group", "language", "prompt", "completion", "logp", "num_scored", "hist_edges", "hist_counts", "score_mean", "score_std", "score_min", "score_max")}
    for q, query in enumerate(queries):
        row = first[q][np.isfinite(first[q])]  # the scan's scores: one estimator for every sequence
        counts, edges = np.histogram(row, bins=HIST_BINS)
        qt["query_index"].append(q)
        qt["query_id"].append(query.id)
        qt["group"].append(query.group)
        qt["language"].append(query.language)
        qt["prompt"].append(query.prompt)
        qt["completion"].append(query.completion)
        qt["logp"].append(float(logp[q]))
        qt["num_scored"].append(int(row.size))
        qt["hist_edges"].append(edges.tolist())
        qt["hist_counts"].append(counts.astype(np.int64).tolist())
        qt["score_mean"].append(float(row.mean()))
        qt["score_std"].append(float(row.std()))
        qt["score_min"].append(float(row.min()))
        qt["score_max"].append(float(row.max()))
    _write(run_dir / layout.QUERIES_TABLE, table(qt, {"group": pa.string(), "language": pa.string(), "hist_edges": pa.list_(pa.float64()), "hist_counts": pa.list_(pa.int64())}))


__all__ = ["write_tables", "block_of", "TokenText", "HIST_BINS"]
