"""Read what the report shows from a run directory (docs/run-directory.md has every column).

Only the rows the report displays are kept: the ``top`` most positive and most
negative sequences of each query, with their per-token and per-block scores.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ..storage.layout import (
    LAYERS_TABLE,
    QUERIES_TABLE,
    RUN_CONFIG,
    RUN_MANIFEST,
    SEQUENCES_FILE,
    TOKENS_TABLE,
    TOP_TABLE,
)

logger = logging.getLogger(__name__)

PRODUCER = "lminfluence score"  # the command that writes every file the report needs

QUERY_COLUMNS = (
    "query_index", "query_id", "prompt", "completion", "logp", "num_scored",
    "hist_edges", "hist_counts", "score_mean", "score_std", "score_min", "score_max",
)  # fmt: skip
TOP_COLUMNS = ("query_index", "rank", "seq_index", "doc_id", "chunk", "char_start", "char_end", "score", "text")
TOP_OPTIONAL = ("first_stage_score", "tfidf", "block_scores")
LAYER_COLUMNS = ("query_index", "seq_index", "block", "score")
TOKEN_COLUMNS = ("query_index", "seq_index", "position", "token", "score")


@dataclass
class Shown:
    """One training sequence shown under a query: a row of top.parquet and its breakdowns."""

    rank: int
    seq_index: int
    doc_id: str
    chunk: int
    char_start: int
    char_end: int
    score: float
    first_stage_score: float | None
    tfidf: float | None
    text: str
    block_scores: list[float] | None = None  # one per transformer block, in block order
    tokens: list[str] | None = None  # in position order
    token_scores: np.ndarray | None = None  # float64 [T], aligned with tokens


@dataclass
class Query:
    """One row of queries.parquet with its shown sequences."""

    index: int
    id: str
    prompt: str
    completion: str
    logp: float
    num_scored: int
    hist_edges: list[float]
    hist_counts: list[int]
    mean: float
    std: float
    min: float
    max: float
    positive: list[Shown]  # rank 1, 2, ...
    negative: list[Shown]  # rank -1, -2, ...


@dataclass
class Run:
    path: Path
    manifest: dict[str, Any]  # run.json
    config: dict[str, Any]  # config.yaml (empty when absent)
    num_sequences: int | None  # rows of corpus/sequences.parquet, when it is there
    queries: list[Query]


def _require(run_dir: Path, rel: str) -> Path:
    path = run_dir / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the report reads {rel} of a run directory; "
            f"run `{PRODUCER}` on {run_dir} first (it writes run.json and scores/)"
        )
    return path


def _read(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> pa.Table:
    names = set(pq.read_schema(path).names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (docs/run-directory.md lists its schema)")
    return pq.read_table(path, columns=list(columns) + [c for c in optional if c in names])


def _keys(query_index: np.ndarray, seq_index: np.ndarray) -> np.ndarray:
    return (query_index.astype(np.int64) << 32) | seq_index.astype(np.int64)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _float_or_none(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def _shown_rows(top_path: Path, top: int) -> dict[int, list[Shown]]:
    """The ``top`` most positive and most negative rows of each query, by rank."""
    table = _read(top_path, TOP_COLUMNS, TOP_OPTIONAL)
    rank = table.column("rank").to_numpy()
    query = table.column("query_index").to_numpy()
    keep = (np.abs(rank) >= 1) & (np.abs(rank) <= top)
    rows = table.filter(pa.array(keep)).to_pylist()
    out: dict[int, list[Shown]] = {}
    for r in sorted(rows, key=lambda r: (r["query_index"], r["rank"] < 0, abs(r["rank"]))):
        blocks = r.get("block_scores")
        out.setdefault(int(r["query_index"]), []).append(
            Shown(
                rank=int(r["rank"]),
                seq_index=int(r["seq_index"]),
                doc_id=str(r["doc_id"]),
                chunk=int(r["chunk"]),
                char_start=int(r["char_start"]),
                char_end=int(r["char_end"]),
                score=float(r["score"]),
                first_stage_score=_float_or_none(r.get("first_stage_score")),
                tfidf=_float_or_none(r.get("tfidf")),
                text=r["text"] or "",
                block_scores=[float(b) for b in blocks] if blocks else None,
            )
        )
    logger.debug("top.parquet: %d rows of %d queries shown", len(rows), len(np.unique(query)))
    return out


def _attach_tokens(path: Path, shown: dict[tuple[int, int], list[Shown]]) -> None:
    """Fill tokens/token_scores of the shown sequences from tokens.parquet, in position order."""
    table = _read(path, TOKEN_COLUMNS)
    wanted = np.fromiter((_keys(np.int64(q), np.int64(s)) for q, s in shown), dtype=np.int64, count=len(shown))
    key = _keys(table.column("query_index").to_numpy(), table.column("seq_index").to_numpy())
    table = table.filter(pa.array(np.isin(key, wanted)))
    if table.num_rows == 0:
        return
    key = _keys(table.column("query_index").to_numpy(), table.column("seq_index").to_numpy())
    order = np.lexsort((table.column("position").to_numpy(), key))
    key, position = key[order], table.column("position").to_numpy()[order]
    # a sequence among both the most positive and the most negative has its tokens twice: keep one
    first = np.r_[True, (key[1:] != key[:-1]) | (position[1:] != position[:-1])]
    order, key = order[first], key[first]
    tokens = table.column("token").take(pa.array(order)).to_pylist()
    scores = table.column("score").to_numpy()[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(key)]):
        k = int(key[a])
        for s in shown[(k >> 32, k & 0xFFFFFFFF)]:
            s.tokens = [t or "" for t in tokens[a:b]]
            s.token_scores = scores[a:b]


def _attach_blocks(path: Path, shown: dict[tuple[int, int], list[Shown]]) -> None:
    """Sum layers.parquet within each block for sequences whose top.parquet row had no block_scores."""
    need = {k: rows for k, rows in shown.items() if any(s.block_scores is None for s in rows)}
    if not need or not path.is_file():
        return
    table = _read(path, LAYER_COLUMNS)
    per: dict[tuple[int, int], dict[int, float]] = {}
    for q, s, block, score in zip(*(table.column(c).to_pylist() for c in LAYER_COLUMNS)):
        if (q, s) in need and block is not None and block >= 0:
            d = per.setdefault((q, s), {})
            d[block] = d.get(block, 0.0) + float(score)
    for k, d in per.items():
        blocks = [0.0] * (max(d) + 1)
        for b, v in d.items():
            blocks[b] = v
        for s in need[k]:
            s.block_scores = s.block_scores or blocks


def load_run(run_dir: str | Path, top: int) -> Run:
    """Read run.json, config.yaml and the score tables, keeping what a report with ``top`` cards shows.

    Raises:
        FileNotFoundError: run.json, scores/queries.parquet or scores/top.parquet is missing.
        ValueError: a table lacks a column the report needs.
    """
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory; `{PRODUCER}` creates one")
    manifest = json.loads(_require(run_dir, RUN_MANIFEST).read_text())
    queries_path = _require(run_dir, QUERIES_TABLE)
    top_path = _require(run_dir, TOP_TABLE)

    by_query = _shown_rows(top_path, top)
    shown: dict[tuple[int, int], list[Shown]] = {}
    for q, rows in by_query.items():
        for s in rows:
            shown.setdefault((q, s.seq_index), []).append(s)
    if shown and (run_dir / TOKENS_TABLE).is_file():
        _attach_tokens(run_dir / TOKENS_TABLE, shown)
    _attach_blocks(run_dir / LAYERS_TABLE, shown)

    queries = []
    for r in sorted(_read(queries_path, QUERY_COLUMNS).to_pylist(), key=lambda r: r["query_index"]):
        rows = by_query.get(int(r["query_index"]), [])
        queries.append(
            Query(
                index=int(r["query_index"]),
                id=str(r["query_id"]),
                prompt=r["prompt"] or "",
                completion=r["completion"] or "",
                logp=float(r["logp"]),
                num_scored=int(r["num_scored"]),
                hist_edges=[float(x) for x in r["hist_edges"] or []],
                hist_counts=[int(x) for x in r["hist_counts"] or []],
                mean=float(r["score_mean"]),
                std=float(r["score_std"]),
                min=float(r["score_min"]),
                max=float(r["score_max"]),
                positive=[s for s in rows if s.rank > 0],
                negative=[s for s in rows if s.rank < 0],
            )
        )
    seq_path = run_dir / SEQUENCES_FILE
    num_sequences = pq.read_metadata(seq_path).num_rows if seq_path.is_file() else None
    return Run(run_dir, manifest, _read_config(run_dir / RUN_CONFIG), num_sequences, queries)
