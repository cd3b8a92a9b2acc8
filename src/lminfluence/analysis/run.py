"""`analyze_run`: every analysis of a scored run directory, written under RUN/analysis/.

Reads scores/queries.parquet, scores/matrix.parquet (every scored pair),
scores/top.parquet, scores/layers.parquet and scores/tokens.parquet, and writes
analysis/{sparsity,layers,thirds,spurious,crosslingual}.parquet, plus
analysis/word_order.parquet when statement pairs are given (that one needs the
model: it scores new sequences). docs/run-directory.md describes every column.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.readers import InputError, Query
from ..storage import layout
from .crosslingual import crosslingual_rows
from .files import load_scores, read_columns, require, write_table
from .sparsity import MAX_CANDIDATES, MIN_TAIL
from .tables import SCHEMAS, layer_columns, sparsity_columns, spurious_columns
from .word_order import StatementPair, as_pairs, score_word_order, summarize_word_order

logger = logging.getLogger(__name__)

TABLES = ("sparsity", "layers", "thirds", "spurious", "crosslingual", "word_order")
DEFAULT_K = 10  # the score command's default --top


def table_path(run_dir: str | Path, name: str) -> Path:
    """RUN/analysis/<name>.parquet."""
    return Path(run_dir) / layout.ANALYSIS_DIR / f"{name}.parquet"


@dataclass
class Analysis:
    """What ``analyze_run`` wrote: table name → path, the k used, and the word-order summary (None without pairs)."""

    tables: dict[str, Path]
    k: int
    word_order: dict[str, float] | None = None
    seconds: float = 0.0


def _default_k(top: dict[str, Any]) -> int:
    """The run's --top: the largest rank it shows (DEFAULT_K for a run that shows nothing)."""
    ranks = np.abs(top["rank"])
    return int(ranks.max()) if ranks.size else DEFAULT_K


def analyze_run(
    run_dir: str | Path,
    *,
    k: int | None = None,
    word_order_pairs: str | Path | Iterable[StatementPair | Mapping[str, Any]] | None = None,
    model=None,
    tokenizer: Any = None,
    factors=None,
    min_tail: int = MIN_TAIL,
    max_candidates: int | None = MAX_CANDIDATES,
) -> Analysis:
    """Compute the paper's analyses (docs/method.md §7) of a scored run and write them under RUN/analysis/.

    Args:
        run_dir: a run directory where ``lminfluence score`` has run (with its default ``--save-matrix``).
        k: sequences per end of each query's lists used by the layer, spurious and
            cross-lingual analyses (None = the run's --top: every shown sequence).
        word_order_pairs: statement pairs (a JSON Lines path, ``StatementPair``s or
            dicts) to score in both word orders; None skips the word-order table
            (an earlier word_order.parquet is left as it is).
        model, tokenizer, factors: for the word-order scores; loaded from the run
            when None.
        min_tail, max_candidates: passed to ``fit_power_law``.

    Returns:
        What was written.

    Raises:
        InputError: a score table is missing (the message says which command makes it).
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if k is not None and k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    queries, scores, _ = load_scores(run_dir)
    top = read_columns(require(run_dir, layout.TOP_TABLE), ["query_index", "seq_index", "rank"])
    layers = read_columns(require(run_dir, layout.LAYERS_TABLE), ["query_index", "seq_index", "layer", "score"])
    tokens = read_columns(require(run_dir, layout.TOKENS_TABLE), ["query_index", "seq_index", "score"])
    ids = queries["query_id"]
    k_used = k if k is not None else _default_k(top)
    pairs = as_pairs(word_order_pairs) if word_order_pairs is not None else None  # bad pairs fail before any work
    unknown = sorted({p.query_id for p in pairs or []} - set(ids))
    if unknown:
        raise InputError(f"statement pairs name unknown query id(s) {', '.join(map(repr, unknown))}; the run's queries are {', '.join(map(repr, ids))}")

    built = {"sparsity": sparsity_columns(ids, scores, min_tail=min_tail, max_candidates=max_candidates)}
    built["layers"], built["thirds"] = layer_columns(ids, top, layers, k_used)
    built["spurious"] = spurious_columns(top, tokens, k_used)
    built["crosslingual"] = crosslingual_rows(scores, ids, queries["group"], queries["language"], k_used)
    summary = None
    if pairs is not None:
        built["word_order"] = _word_order(run_dir, queries, pairs, model, tokenizer, factors)
        summary = summarize_word_order(built["word_order"])
    written = {name: write_table(table_path(run_dir, name), cols, SCHEMAS[name]) for name, cols in built.items()}
    seconds = time.perf_counter() - t0
    _record(run_dir, k_used, summary, seconds)
    logger.info("wrote %d analysis tables for %d queries in %.1fs", len(written), len(ids), seconds)
    return Analysis(tables=written, k=k_used, word_order=summary, seconds=seconds)


def _word_order(run_dir: Path, queries: dict[str, Any], pairs: list[StatementPair], model, tokenizer, factors) -> dict[str, list]:
    """Score the statement pairs with the run's model, factors, damping and --max-length."""
    from ..config import ScoreConfig
    from ..workflow.config import RunConfig, read_yaml
    from ..workflow.fitting import load_run_factors
    from ..workflow.model import load_model, load_tokenizer
    from ..workflow.rundir import RunDir

    config = RunConfig.from_dict(read_yaml(require(run_dir, layout.RUN_CONFIG, "it is not an lminfluence run directory")), str(run_dir / layout.RUN_CONFIG))
    if config.score is None:
        raise InputError(f"{run_dir} has no score settings; run `lminfluence score` first")
    s = config.score
    model = model if model is not None else load_model(config.model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    if factors is None:
        factors = load_run_factors(RunDir(run_dir), model)
    cfg = ScoreConfig(damping_scale=s.scoring.damping_scale, damping=s.scoring.damping)
    qs = [Query(i, p, c) for i, p, c in zip(queries["query_id"], queries["prompt"], queries["completion"])]
    return score_word_order(model, tokenizer, factors, qs, pairs, max_length=config.corpus.max_length, config=cfg, execution=s.execution)


def _record(run_dir: Path, k: int, summary: dict[str, float] | None, seconds: float) -> None:
    """Note the analysis in run.json (when the directory has one), as the other stages do."""
    from ..workflow.rundir import RunDir, now

    rd = RunDir(run_dir)
    if (rd / layout.RUN_MANIFEST).is_file():
        rd.update_manifest(analysis={"k": k, "word_order": summary, "seconds": round(seconds, 2), "finished": now()})


__all__ = ["analyze_run", "Analysis", "table_path", "TABLES"]
