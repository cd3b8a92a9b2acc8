"""A small synthetic run directory, written with pyarrow exactly as docs/run-directory.md specifies.

Known content the report tests look for:
- query 0 has 4 positive and 2 negative sequences; its rank-1 sequence has a strongly positive
  token (STRONG_POS, score +1) and a strongly negative one (STRONG_NEG, score -1), a token
  holding ``<script>`` and a newline token; its block_scores are BLOCKS_Q0_R1;
- query 1 has 2 positive and 1 negative sequences; its rank-1 row has no block_scores
  (layers.parquet has them: LAYER_BLOCKS_Q1_R1 after summing within blocks);
- query 2 has 1 positive sequence without token rows (plain text with a note).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lminfluence.storage import layout

STRONG_POS = " Paris"
STRONG_NEG = " Berlin"
SCRIPT_TOKEN = " <script>alert('x')</script>"
BLOCKS_Q0_R1 = [0.5, -0.25, 0.125, 0.75]
LAYER_BLOCKS_Q1_R1 = [0.3, -0.6, 0.2, 0.1]
PLAIN_TEXT = "A sequence whose tokens were not saved & so is shown as <plain> text."

QUERIES = [
    ("capital", "The capital of France is", " Paris"),
    ("html<b>", "Escape <b>this</b> & that:", " done"),
    ("plain", "Two plus two is", " four"),
]

# query_index -> list of (rank, tokens, token scores or None, block_scores or None)
SEQUENCES: dict[int, list[tuple[int, list[str], list[float] | None, list[float] | None]]] = {
    0: [
        (1, ["The", " capital", " of", " France", " is", STRONG_POS, ".", "\n", "Not", STRONG_NEG, SCRIPT_TOKEN, "."],
         [0.05, 0.1, 0.0, 0.3, 0.6, 1.0, 0.02, 0.1, -0.2, -1.0, 0.4, 0.0], BLOCKS_Q0_R1),
        (2, ["France", "'s", " capital", " city", "."], [0.2, -0.1, 0.5, 0.05, 0.0], [0.2, 0.1, 0.3, 0.05]),
        (3, ["Paris", " is", " large", "."], [0.3, 0.1, -0.05, 0.0], [0.1, 0.1, -0.1, 0.2]),
        (4, ["Capitals", " of", " Europe", "\n"], [0.1, 0.02, 0.2, 0.0], [0.05, 0.05, 0.05, 0.05]),
        (-1, ["Berlin", " is", " the", " capital", "."], [-0.4, -0.1, 0.0, -0.3, 0.0], [-0.2, -0.3, 0.1, -0.1]),
        (-2, ["Rome", " is", " old", "."], [-0.2, 0.05, -0.1, 0.0], [-0.1, -0.05, 0.0, -0.05]),
    ],
    1: [
        (1, ["Escape", " <b>", "this", "</b>", " &", " that"], [0.4, 0.9, 0.1, -0.3, 0.2, 0.0], None),
        (2, ["done", " and", " dusted"], [0.3, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1]),
        (-1, ["never", " finished"], [-0.5, 0.0], [-0.1, -0.1, -0.1, -0.1]),
    ],
    2: [(1, [PLAIN_TEXT], None, [0.01, 0.02, 0.03, 0.04])],
}


def seq_index(query: int, rank: int) -> int:
    return 10 * query + (rank if rank > 0 else 5 - rank)


def doc_id(query: int, rank: int) -> str:
    return f"doc-{query}-{'p' if rank > 0 else 'n'}{abs(rank)}.txt"


def sequence_score(tokens_scores: list[float] | None, blocks: list[float] | None, rank: int) -> float:
    """Scores consistent with the breakdowns where there is one, and ordered by rank."""
    if tokens_scores is not None:
        return float(sum(tokens_scores))
    return float(sum(blocks)) if blocks else float(1.0 / rank)


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def make_run(run: Path, with_tokens: bool = True) -> Path:
    """Write run.json, config.yaml and the four score tables under ``run``."""
    run.mkdir(parents=True, exist_ok=True)
    (run / layout.RUN_MANIFEST).write_text(json.dumps({
        "lminfluence_version": "0.1.0",
        "model": {"path": "toy/tiny-gpt2", "fingerprint": "0123456789abcdef0123"},
        "train_size": 50,
        "stages": {"fit": {"seconds": 12.5}, "score": {"seconds": 3.25}},
    }))  # fmt: skip
    (run / layout.RUN_CONFIG).write_text(
        "model:\n  path: toy/tiny-gpt2\nfit:\n  strategy: ekfac\nscore:\n  damping_scale: 0.1\n"
        "  damping: null\n  query_rank: 32\n  candidates: null\n"
    )
    rng = np.random.default_rng(0)
    qrows, trows, lrows, krows = [], [], [], []
    for qi, (qid, prompt, completion) in enumerate(QUERIES):
        scores = rng.normal(0.0, 0.3, size=200)
        counts, edges = np.histogram(scores, bins=40)
        qrows.append({
            "query_index": qi, "query_id": qid, "prompt": prompt, "completion": completion,
            "logp": -1.5 - qi, "num_scored": 200, "hist_edges": edges.tolist(), "hist_counts": counts.tolist(),
            "score_mean": float(scores.mean()), "score_std": float(scores.std()),
            "score_min": float(scores.min()), "score_max": float(scores.max()),
        })  # fmt: skip
        for rank, toks, tok_scores, blocks in SEQUENCES[qi]:
            si = seq_index(qi, rank)
            text = "".join(toks)
            score = sequence_score(tok_scores, blocks, rank)
            trows.append({
                "query_index": qi, "query_id": qid, "rank": rank, "seq_index": si, "doc_id": doc_id(qi, rank),
                "chunk": abs(rank) - 1, "char_start": 100 * abs(rank), "char_end": 100 * abs(rank) + len(text),
                "score": score, "first_stage_score": score * 0.9, "tfidf": None, "block_scores": blocks, "text": text,
            })  # fmt: skip
            layer_blocks = blocks if blocks is not None else LAYER_BLOCKS_Q1_R1
            for b, v in enumerate(layer_blocks):  # two tracked layers per block, halves of its share
                for name in ("mlp.c_fc", "mlp.c_proj"):
                    lrows.append({"query_index": qi, "seq_index": si, "layer": f"h.{b}.{name}", "block": b, "score": v / 2})
            if with_tokens and tok_scores is not None:
                for pos, (tok, s) in reversed(list(enumerate(zip(toks, tok_scores)))):  # out of order on purpose
                    krows.append({"query_index": qi, "seq_index": si, "position": pos, "token_id": 1000 + pos,
                                  "token": tok, "score": s})  # fmt: skip
    _write(pa.Table.from_pylist(qrows, schema=QUERIES_SCHEMA), run / layout.QUERIES_TABLE)
    _write(pa.Table.from_pylist(trows, schema=TOP_SCHEMA), run / layout.TOP_TABLE)
    _write(pa.Table.from_pylist(lrows, schema=LAYERS_SCHEMA), run / layout.LAYERS_TABLE)
    _write(pa.Table.from_pylist(krows, schema=TOKENS_SCHEMA), run / layout.TOKENS_TABLE)
    return run


def shown_token_count(top: int) -> int:
    """Token rows of the sequences a report with ``top`` cards per list shows."""
    return sum(
        len(toks) for rows in SEQUENCES.values() for rank, toks, s, _ in rows if s is not None and abs(rank) <= top
    )


QUERIES_SCHEMA = pa.schema([
    ("query_index", pa.int64()), ("query_id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("logp", pa.float64()), ("num_scored", pa.int64()), ("hist_edges", pa.list_(pa.float64())),
    ("hist_counts", pa.list_(pa.int64())), ("score_mean", pa.float64()), ("score_std", pa.float64()),
    ("score_min", pa.float64()), ("score_max", pa.float64()),
])  # fmt: skip
TOP_SCHEMA = pa.schema([
    ("query_index", pa.int64()), ("query_id", pa.string()), ("rank", pa.int32()), ("seq_index", pa.int64()),
    ("doc_id", pa.string()), ("chunk", pa.int32()), ("char_start", pa.int64()), ("char_end", pa.int64()),
    ("score", pa.float64()), ("first_stage_score", pa.float64()), ("tfidf", pa.float64()),
    ("block_scores", pa.list_(pa.float64())), ("text", pa.string()),
])  # fmt: skip
LAYERS_SCHEMA = pa.schema([
    ("query_index", pa.int64()), ("seq_index", pa.int64()), ("layer", pa.string()), ("block", pa.int32()),
    ("score", pa.float64()),
])  # fmt: skip
TOKENS_SCHEMA = pa.schema([
    ("query_index", pa.int64()), ("seq_index", pa.int64()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("token", pa.string()), ("score", pa.float64()),
])  # fmt: skip
