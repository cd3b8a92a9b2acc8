"""Reading a run's score tables into arrays and writing analysis tables (pyarrow only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.readers import InputError
from ..storage import layout
from ..storage.atomic import atomic_write

SCORE_HINT = "run `lminfluence score` on it first"


def require(run_dir: Path, rel: str, fix: str = SCORE_HINT) -> Path:
    """``run_dir / rel``, or an InputError naming the fix when it is missing."""
    path = Path(run_dir) / rel
    if not path.is_file():
        raise InputError(f"{path} is missing: {fix}")
    return path


def read_columns(path: Path, columns: list[str] | None = None) -> dict[str, Any]:
    """A Parquet table as column → numpy array (numbers, booleans) or list (strings, lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        kind = col.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            out[name] = col.to_numpy()
        else:
            out[name] = col.to_pylist()
    return out


def dense_scores(query_index: np.ndarray, seq_index: np.ndarray, score: np.ndarray, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """matrix.parquet rows as a dense [Q, U] float64 array over the U sequences scored by some query.

    Returns:
        (scores [Q, U] with NaN where a query did not score a sequence, the U sequence indices, increasing).
    """
    columns, col = np.unique(np.asarray(seq_index, dtype=np.int64), return_inverse=True)
    out = np.full((num_queries, columns.size), np.nan)
    out[np.asarray(query_index, dtype=np.int64), col] = np.asarray(score, dtype=np.float64)
    return out, columns


def load_scores(run_dir: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(queries.parquet columns, dense scores [Q, U] of matrix.parquet, their sequence indices [U])."""
    queries = read_columns(require(run_dir, layout.QUERIES_TABLE))
    matrix_path = require(
        run_dir,
        layout.MATRIX_TABLE,
        "the analyses need every scored pair; run `lminfluence score` again with --save-matrix (the default; it was turned off)",
    )
    m = read_columns(matrix_path, ["query_index", "seq_index", "score"])
    scores, columns = dense_scores(m["query_index"], m["seq_index"], m["score"], len(queries["query_id"]))
    return queries, scores, columns


def write_table(path: Path, columns: dict[str, Any], schema) -> Path:
    """Write ``columns`` with ``schema`` (a pyarrow schema fixing every column's type) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


__all__ = ["require", "read_columns", "dense_scores", "load_scores", "write_table", "SCORE_HINT"]
