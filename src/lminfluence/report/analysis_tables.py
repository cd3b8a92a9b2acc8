"""Read the analysis tables of a run (``lminfluence analyze``; docs/run-directory.md, "analysis/").

Every table is optional: the report shows what is there and says how to get the
rest. A table that is there must have its documented columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ANALYZER = "lminfluence analyze"
SPARSITY_TABLE = "analysis/sparsity.parquet"
LAYER_SHARES_TABLE = "analysis/layers.parquet"
THIRDS_TABLE = "analysis/thirds.parquet"
SPURIOUS_TABLE = "analysis/spurious.parquet"
CROSSLINGUAL_TABLE = "analysis/crosslingual.parquet"

SPARSITY_COLUMNS = (
    "query_index", "num_scored", "num_positive", "alpha", "x_min", "tail_size", "ks",
    "share_top_0_1pct", "share_top_1pct", "share_top_10pct", "curve_rank", "curve_score",
)  # fmt: skip
LAYER_SHARE_COLUMNS = ("query_index", "layer", "block", "third", "share")
THIRDS_COLUMNS = (
    "query_index", "share_lower", "share_middle", "share_upper", "spearman_lower", "spearman_middle", "spearman_upper",
)  # fmt: skip
SPURIOUS_COLUMNS = ("query_index", "seq_index", "l2_l1", "spurious")
CROSSLINGUAL_COLUMNS = ("group", "language_from", "language_to", "query_from", "query_to", "k", "captured", "overlap", "spearman")


@dataclass
class Analysis:
    """The analysis tables that were found, keyed for the report."""

    sparsity: dict[int, dict[str, Any]] = field(default_factory=dict)  # query_index → row
    layer_shares: dict[int, list[tuple[str, int, str, float]]] = field(default_factory=dict)  # → (layer, block, third, share)
    thirds: dict[int, dict[str, float]] = field(default_factory=dict)  # query_index → row
    spurious: dict[tuple[int, int], tuple[float, bool]] = field(default_factory=dict)  # (query, seq) → (l2_l1, flagged)
    crosslingual: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # group → rows
    found: set[str] = field(default_factory=set)  # the tables read


def _rows(run_dir: Path, rel: str, columns: tuple[str, ...], analysis: Analysis) -> list[dict[str, Any]]:
    path = run_dir / rel
    if not path.is_file():
        return []
    names = set(pq.read_schema(path).names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (docs/run-directory.md lists its schema); rerun `{ANALYZER}`")
    analysis.found.add(rel)
    return pq.read_table(path, columns=list(columns)).to_pylist()


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def read_analysis(run_dir: Path) -> Analysis:
    """The analysis tables under ``run_dir/analysis/`` that exist."""
    a = Analysis()
    for r in _rows(run_dir, SPARSITY_TABLE, SPARSITY_COLUMNS, a):
        r["curve_rank"] = [int(x) for x in r["curve_rank"] or []]
        r["curve_score"] = [float(x) for x in r["curve_score"] or []]
        a.sparsity[int(r["query_index"])] = r
    for r in _rows(run_dir, LAYER_SHARES_TABLE, LAYER_SHARE_COLUMNS, a):
        a.layer_shares.setdefault(int(r["query_index"]), []).append((str(r["layer"]), int(r["block"]), str(r["third"]), _float(r["share"])))
    for r in _rows(run_dir, THIRDS_TABLE, THIRDS_COLUMNS, a):
        a.thirds[int(r["query_index"])] = {k: _float(v) for k, v in r.items() if k != "query_index"}
    for r in _rows(run_dir, SPURIOUS_TABLE, SPURIOUS_COLUMNS, a):
        l2_l1 = _float(r["l2_l1"])
        a.spurious[(int(r["query_index"]), int(r["seq_index"]))] = (l2_l1, bool(r["spurious"]) and not math.isnan(l2_l1))
    for r in _rows(run_dir, CROSSLINGUAL_TABLE, CROSSLINGUAL_COLUMNS, a):
        a.crosslingual.setdefault(str(r["group"]), []).append(r)
    return a


__all__ = ["ANALYZER", "Analysis", "read_analysis"]
