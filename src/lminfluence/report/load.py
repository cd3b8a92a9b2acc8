"""Read what the report shows from a run directory (docs/run-directory.md has every file and column).

Only the rows the report displays are kept: the ``top`` most positive and most
negative sequences of each query with their per-token and per-block scores, the
documents they come from (every chunk, for the full-text view), and the optional
analysis tables (analysis_tables.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ..errors import CorruptFileError, StaleError
from ..storage import layout
from .analysis_tables import Analysis, read_analysis

logger = logging.getLogger(__name__)

PRODUCER = "lminfluence score"  # the command that writes every file the report needs
BATCH_ROWS = 1 << 20  # rows of matrix.parquet read at a time
CONTEXT_SHARE = 1.0  # the chunks not shown add at most this share of the shown text to the full-text view

QUERY_COLUMNS = (
    "query_index", "query_id", "group", "language", "prompt", "completion", "logp", "num_scored",
    "hist_edges", "hist_counts", "score_mean", "score_std", "score_min", "score_max",
)  # fmt: skip
TOP_COLUMNS = (
    "query_index", "rank", "seq_index", "doc_id", "chunk", "char_start", "char_end", "score",
    "first_stage_score", "tfidf", "block_scores",
)  # fmt: skip
LAYER_COLUMNS = ("layer", "block")
TOKEN_COLUMNS = ("query_index", "seq_index", "position", "token", "score")
SEQUENCE_COLUMNS = ("seq_index", "doc_id", "chunk", "char_start", "char_end", "text")


@dataclass
class Card:
    """One training sequence shown under a query: a row of top.parquet and its breakdowns."""

    rank: int
    seq_index: int
    doc_id: str
    chunk: int
    char_start: int
    char_end: int
    score: float
    first_stage_score: float
    tfidf: float | None
    block_scores: list[float]  # one per transformer block, in block order
    tokens: list[str] = field(default_factory=list)  # each token's piece of the text, in position order
    token_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 [T], aligned with tokens
    l2_l1: float | None = None  # ‖a‖₂/‖a‖₁ of the token scores, from analysis/spurious.parquet
    spurious: bool | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class Query:
    """One row of queries.parquet with its shown sequences."""

    index: int
    id: str
    group: str | None
    language: str | None
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
    positive: list[Card]  # rank 1, 2, ...
    negative: list[Card]  # rank -1, -2, ...

    @property
    def cards(self) -> list[Card]:
        return self.positive + self.negative


@dataclass
class Chunk:
    """One sequence of a document (a row of corpus/sequences.parquet)."""

    seq_index: int
    chunk: int
    char_start: int
    char_end: int
    text: str


@dataclass
class Run:
    """Everything the report shows of one run directory."""

    path: Path
    manifest: dict[str, Any]  # run.json
    config: dict[str, Any]  # config.yaml
    layers: list[tuple[str, int]]  # tracked layers (name, block), in the order of layers.parquet
    queries: list[Query]
    documents: dict[str, list[Chunk]]  # the shown documents, chunks in order (some left out of very long ones)
    analysis: Analysis
    scan: dict[tuple[int, int], tuple[int, float]]  # (query, seq) → (rank, score) in the scan, for the group comparisons


def groups(queries: list[Query]) -> dict[str, list[Query]]:
    """Queries sharing a ``group`` (two or more), in query order; groups in the order of their first query."""
    by: dict[str, list[Query]] = {}
    for q in queries:
        if q.group is not None:
            by.setdefault(q.group, []).append(q)
    return {g: qs for g, qs in by.items() if len(qs) >= 2}


def scan_positions(path: Path, wanted: dict[int, set[int]]) -> dict[tuple[int, int], tuple[int, float]]:
    """Rank (1 = highest) and score of the ``wanted`` sequences among all the scan scores of their query.

    Two passes over matrix.parquet in batches, so memory stays bounded whatever its size.
    """
    if not wanted:
        return {}
    try:
        table = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise _damaged(path, e) from e
    columns = ["query_index", "seq_index", "score"]
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (docs/run-directory.md lists its schema)")
    keys = np.array(sorted((q << 32) | s for q, seqs in wanted.items() for s in seqs), dtype=np.int64)
    found: dict[tuple[int, int], float] = {}
    for batch in table.iter_batches(columns=columns, batch_size=BATCH_ROWS):
        q, s, v = (batch.column(i).to_numpy() for i in range(3))
        hit = np.isin(_keys(q, s), keys)
        found.update({(int(a), int(b)): float(c) for a, b, c in zip(q[hit], s[hit], v[hit])})
    targets: dict[int, list[tuple[int, float]]] = {}
    for (q, s), v in found.items():
        targets.setdefault(q, []).append((s, v))
    above = dict.fromkeys(found, 0)
    for batch in table.iter_batches(columns=["query_index", "score"], batch_size=BATCH_ROWS):
        q, v = (batch.column(i).to_numpy() for i in range(2))
        for qi in np.intersect1d(np.unique(q), np.fromiter(targets, dtype=np.int64, count=len(targets))).tolist():
            values = np.sort(v[q == qi])
            for s, t in targets[qi]:
                above[(qi, s)] += int(len(values) - np.searchsorted(values, t, side="right"))
    return {k: (above[k] + 1, v) for k, v in found.items()}


def _require(run_dir: Path, rel: str, producer: str = PRODUCER) -> Path:
    path = run_dir / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the report reads {rel} of a run directory; run `{producer}` on {run_dir} first")
    return path


def _damaged(path: Path, error: Exception) -> CorruptFileError:
    """The error for a run-directory file that cannot be parsed, naming it."""
    return CorruptFileError(
        f"{path} is damaged ({type(error).__name__}: {' '.join(str(error).split())[:200]}); run the command that writes it again"
    )


def read_columns(path: Path, columns: tuple[str, ...], filters: Any = None) -> pa.Table:
    """The ``columns`` of a Parquet table; a missing column or a damaged file is an error that names it."""
    try:
        names = set(pq.read_schema(path).names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (docs/run-directory.md lists its schema)")
        return pq.read_table(path, columns=list(columns), filters=filters)
    except pa.ArrowException as e:
        raise _damaged(path, e) from e


def _keys(query_index: np.ndarray, seq_index: np.ndarray) -> np.ndarray:
    return (query_index.astype(np.int64) << 32) | seq_index.astype(np.int64)


def _none_if_nan(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def _cards(top_path: Path, top: int) -> dict[int, list[Card]]:
    """The ``top`` most positive and most negative rows of each query, by rank."""
    table = read_columns(top_path, TOP_COLUMNS)
    rank = table.column("rank").to_numpy()
    rows = table.filter(pa.array((np.abs(rank) >= 1) & (np.abs(rank) <= top))).to_pylist()
    out: dict[int, list[Card]] = {}
    for r in sorted(rows, key=lambda r: (r["query_index"], r["rank"] < 0, abs(r["rank"]))):
        out.setdefault(int(r["query_index"]), []).append(
            Card(
                rank=int(r["rank"]),
                seq_index=int(r["seq_index"]),
                doc_id=str(r["doc_id"]),
                chunk=int(r["chunk"]),
                char_start=int(r["char_start"]),
                char_end=int(r["char_end"]),
                score=float(r["score"]),
                first_stage_score=float(r["first_stage_score"]),
                tfidf=_none_if_nan(r["tfidf"]),
                block_scores=[float(b) for b in r["block_scores"] or []],
            )
        )
    return out


def _attach_tokens(path: Path, shown: dict[tuple[int, int], list[Card]]) -> None:
    """Fill tokens/token_scores of the shown sequences from tokens.parquet, in position order."""
    table = read_columns(path, TOKEN_COLUMNS)
    wanted = np.array([(q << 32) | s for q, s in shown], dtype=np.int64)
    key = _keys(table.column("query_index").to_numpy(), table.column("seq_index").to_numpy())
    table = table.filter(pa.array(np.isin(key, wanted)))
    key = _keys(table.column("query_index").to_numpy(), table.column("seq_index").to_numpy())
    position = table.column("position").to_numpy()
    order = np.lexsort((position, key))
    key, position = key[order], position[order]
    # a sequence among both the most positive and the most negative has its tokens twice: keep one
    first = np.r_[True, (key[1:] != key[:-1]) | (position[1:] != position[:-1])] if len(key) else np.zeros(0, bool)
    order, key = order[first], key[first]
    tokens = table.column("token").take(pa.array(order)).to_pylist()
    scores = table.column("score").to_numpy()[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    found = set()
    for a, b in zip(starts, np.r_[starts[1:], len(key)]):
        k = int(key[a])
        found.add((k >> 32, k & 0xFFFFFFFF))
        for card in shown[(k >> 32, k & 0xFFFFFFFF)]:
            card.tokens = [t or "" for t in tokens[a:b]]
            card.token_scores = scores[a:b]
    missing = sorted(set(shown) - found)
    if missing:
        q, s = missing[0]
        raise ValueError(f"{path} has no token rows for query {q}, sequence {s} ({len(missing)} shown sequences lack them); rerun `{PRODUCER}`")


def _layers(path: Path) -> list[tuple[str, int]]:
    table = read_columns(path, LAYER_COLUMNS)
    seen: dict[str, int] = {}
    for name, block in zip(table.column("layer").to_pylist(), table.column("block").to_pylist()):
        seen.setdefault(name, int(block))
    return list(seen.items())


def _documents(path: Path, cards: list[Card]) -> dict[str, list[Chunk]]:
    """The chunks of each shown document, in order, for the full-text view.

    Every chunk of a document is embedded while the chunks that are not shown add
    at most CONTEXT_SHARE of the shown text: nearest chunks first (±1 around a
    shown chunk, then ±2, …), so a long book adds its neighbouring pages, not
    its whole text.
    """
    doc_ids = sorted({c.doc_id for c in cards})
    if not doc_ids:
        return {}
    spans = read_columns(path, ("seq_index", "doc_id", "chunk", "char_start", "char_end"), filters=[("doc_id", "in", doc_ids)])
    rows = sorted(zip(*(spans.column(c).to_pylist() for c in spans.column_names)), key=lambda r: (r[1], r[2]))
    shown = {(c.doc_id, c.chunk) for c in cards}
    distance: dict[int, int] = {}  # seq_index → distance in chunks to the nearest shown chunk of its document
    by_doc: dict[str, list[tuple]] = {}
    for r in rows:
        by_doc.setdefault(r[1], []).append(r)
    for doc_id, chunks in by_doc.items():
        marks = [r[2] for r in chunks if (doc_id, r[2]) in shown]
        for r in chunks:
            distance[r[0]] = min(abs(r[2] - m) for m in marks) if marks else 1 << 30
    size = {r[0]: r[4] - r[3] for r in rows}
    budget = CONTEXT_SHARE * sum(size[s] for s, d in distance.items() if d == 0)
    keep = {s for s, d in distance.items() if d == 0}
    for s in sorted((s for s, d in distance.items() if d > 0), key=lambda s: distance[s]):
        if size[s] > budget:
            break
        budget -= size[s]
        keep.add(s)
    texts = read_columns(path, ("seq_index", "text"), filters=[("seq_index", "in", sorted(keep))])
    text_of = dict(zip(texts.column("seq_index").to_pylist(), texts.column("text").to_pylist()))
    return {
        doc_id: [Chunk(r[0], r[2], r[3], r[4], text_of[r[0]] or "") for r in chunks if r[0] in keep]
        for doc_id, chunks in by_doc.items()
    }


def load_run(run_dir: str | Path, top: int) -> Run:
    """Read run.json, config.yaml, the score tables and the analysis tables, keeping what ``top`` cards show.

    Raises:
        FileNotFoundError: a file the report needs is missing; the message names it and the command that writes it.
        CorruptFileError: a file is damaged (not JSON, YAML or Parquet); the message names it.
        ValueError: a table lacks a column the report needs, or rows of the shown sequences.
    """
    try:
        return _load_run(run_dir, top)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError, pa.ArrowException) as e:
        raise CorruptFileError(
            f"a file of {run_dir} that the report reads is damaged ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            "run the command that writes it again"
        ) from e


def _check_texts(cards: list[Card], documents: dict[str, list[Any]]) -> None:
    """Every shown sequence's token pieces add up to its text: tables of another run are refused, not drawn wrong."""
    text_of = {c.seq_index: c.text for chunks in documents.values() for c in chunks}
    for card in cards:
        if text_of.get(card.seq_index) != card.text:
            raise StaleError(
                f"the token texts of sequence {card.seq_index} in scores/tokens.parquet do not add up to its text in "
                "corpus/sequences.parquet (tables of another run, or of an lminfluence that decoded each token alone): "
                "run `lminfluence score --overwrite`"
            )


def _load_run(run_dir: str | Path, top: int) -> Run:
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory; `{PRODUCER}` creates one")
    manifest_path, config_path = _require(run_dir, layout.RUN_MANIFEST), _require(run_dir, layout.RUN_CONFIG)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged(manifest_path, e) from e
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _damaged(config_path, e) from e
    queries_path = _require(run_dir, layout.QUERIES_TABLE)
    by_query = _cards(_require(run_dir, layout.TOP_TABLE), top)
    shown: dict[tuple[int, int], list[Card]] = {}
    for q, rows in by_query.items():
        for card in rows:
            shown.setdefault((q, card.seq_index), []).append(card)
    _attach_tokens(_require(run_dir, layout.TOKENS_TABLE), shown)
    layers = _layers(_require(run_dir, layout.LAYERS_TABLE))
    all_cards = [c for rows in by_query.values() for c in rows]
    documents = _documents(_require(run_dir, layout.SEQUENCES_FILE, "lminfluence fit"), all_cards)

    queries = []
    for r in sorted(read_columns(queries_path, QUERY_COLUMNS).to_pylist(), key=lambda r: r["query_index"]):
        rows = by_query.get(int(r["query_index"]), [])
        queries.append(
            Query(
                index=int(r["query_index"]),
                id=str(r["query_id"]),
                group=r["group"],
                language=r["language"],
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
    analysis = read_analysis(run_dir)
    for (q, s), cards in shown.items():
        flag = analysis.spurious.get((q, s))
        for card in cards:
            card.l2_l1, card.spurious = flag if flag is not None else (None, None)
    _check_texts(all_cards, documents)
    logger.debug("read %d queries, %d shown sequences, %d documents", len(queries), len(shown), len(documents))
    scan: dict[tuple[int, int], tuple[int, float]] = {}
    if (run_dir / layout.MATRIX_TABLE).is_file():
        wanted = {q.index: {c.seq_index for p in qs for c in p.positive} for qs in groups(queries).values() for q in qs}
        scan = scan_positions(run_dir / layout.MATRIX_TABLE, wanted)
    return Run(run_dir, manifest, config, layers, queries, documents, analysis, scan)
