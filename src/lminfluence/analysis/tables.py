"""The analysis tables as columns, built from score arrays (pure; run.py reads and writes the files).

docs/run-directory.md documents every column; SCHEMAS fixes every type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..workflow.tables import block_of
from .layers import (
    THIRDS,
    layer_shares,
    layer_thirds,
    third_rank_agreement,
    third_shares,
)
from .sparsity import (
    MAX_CANDIDATES,
    MIN_TAIL,
    SHARE_FRACTIONS,
    fit_power_law,
    rank_curve,
    top_share,
)
from .tokens import grouped_l2_l1, is_spurious

_F, _I32, _I64, _S = pa.float64(), pa.int32(), pa.int64(), pa.string()
SCHEMAS = {
    "sparsity": pa.schema(
        [("query_index", _I32), ("query_id", _S), ("num_scored", _I64), ("num_positive", _I64), ("alpha", _F), ("x_min", _F), ("tail_size", _I64), ("ks", _F)]
        + [("share_top_0_1pct", _F), ("share_top_1pct", _F), ("share_top_10pct", _F), ("curve_rank", pa.list_(_I64)), ("curve_score", pa.list_(_F))]
    ),
    "layers": pa.schema([("query_index", _I32), ("query_id", _S), ("layer", _S), ("block", _I32), ("third", _S), ("share", _F)]),
    "thirds": pa.schema([("query_index", _I32), ("query_id", _S)] + [(f"share_{t}", _F) for t in THIRDS] + [(f"spearman_{t}", _F) for t in THIRDS]),
    "spurious": pa.schema([("query_index", _I32), ("seq_index", _I64), ("rank", _I32), ("l2_l1", _F), ("spurious", pa.bool_())]),
    "crosslingual": pa.schema(
        [("group", _S), ("language_from", _S), ("language_to", _S), ("query_from", _S), ("query_to", _S)]
        + [("k", _I32), ("captured", _F), ("overlap", _F), ("spearman", _F)]
    ),
    "word_order": pa.schema(
        [("pair_id", _S), ("query_id", _S), ("statement", _S), ("flipped", _S), ("score_statement", _F), ("score_flipped", _F), ("kept", _F)]
    ),
}


def sparsity_columns(query_ids: Sequence[str], scores: np.ndarray, *, min_tail: int = MIN_TAIL, max_candidates: int | None = MAX_CANDIDATES) -> dict[str, list]:
    """One row per query of ``scores`` [Q, U] (NaN = not scored): power-law fit, top shares, rank curve."""
    cols: dict[str, list] = {f.name: [] for f in SCHEMAS["sparsity"]}
    for q, qid in enumerate(query_ids):
        row = scores[q][np.isfinite(scores[q])]
        fit = fit_power_law(row, min_tail=min_tail, max_candidates=max_candidates)
        shares = top_share(row, SHARE_FRACTIONS)
        ranks, values = rank_curve(row)
        for name, value in (
            ("query_index", q), ("query_id", qid), ("num_scored", row.size), ("num_positive", int((row > 0).sum())),
            ("alpha", fit.alpha), ("x_min", fit.x_min), ("tail_size", fit.tail_size), ("ks", fit.ks),
            ("share_top_0_1pct", shares[0]), ("share_top_1pct", shares[1]), ("share_top_10pct", shares[2]),
            ("curve_rank", ranks.tolist()), ("curve_score", values.tolist()),
        ):  # fmt: skip
            cols[name].append(value)
    return cols


def _shown(top: dict[str, Any], k: int | None) -> np.ndarray:
    """Rows of top.parquet kept: 1 ≤ |rank| ≤ k (every shown row when k is None)."""
    rank = np.abs(top["rank"])
    return np.flatnonzero((rank >= 1) & (rank <= k)) if k is not None else np.flatnonzero(rank >= 1)


def layer_columns(query_ids: Sequence[str], top: dict[str, Any], layers: dict[str, Any], k: int | None) -> tuple[dict[str, list], dict[str, list]]:
    """The layers table (per query and layer) and the thirds table (per query).

    Args:
        query_ids: [Q].
        top: top.parquet columns query_index, seq_index, rank.
        layers: layers.parquet columns query_index, seq_index, layer, score.
        k: shown sequences kept per end (None = all the run shows).
    """
    names = list(dict.fromkeys(layers["layer"]))  # tracked layers in the run's (model) order
    thirds = layer_thirds(names)
    col_of = {n: i for i, n in enumerate(names)}
    span = int(max(np.max(top["seq_index"], initial=0), np.max(layers["seq_index"], initial=0))) + 1
    keys, row = np.unique(np.asarray(layers["query_index"], np.int64) * span + layers["seq_index"], return_inverse=True)
    per_layer = np.zeros((keys.size, len(names)))  # [pairs, L]
    np.add.at(per_layer, (row, np.array([col_of[n] for n in layers["layer"]], dtype=np.int64)), np.asarray(layers["score"], np.float64))
    kept = _shown(top, k)
    top_keys = np.asarray(top["query_index"][kept], np.int64) * span + top["seq_index"][kept]
    found = np.searchsorted(keys, top_keys)
    if np.any(found >= keys.size) or np.any(keys[np.minimum(found, keys.size - 1)] != top_keys):
        raise ValueError("scores/layers.parquet lacks rows for some sequences of scores/top.parquet: score the run again")
    lt: dict[str, list] = {f.name: [] for f in SCHEMAS["layers"]}
    tt: dict[str, list] = {f.name: [] for f in SCHEMAS["thirds"]}
    for q, qid in enumerate(query_ids):
        mine = top["query_index"][kept] == q
        shown = per_layer[found[mine]]  # [S, L] every shown sequence of q
        positive = (top["rank"][kept][mine] > 0) & (shown.sum(axis=1) > 0)
        shares = layer_shares(shown[positive])
        for i, name in enumerate(names):
            for col, value in zip(("query_index", "query_id", "layer", "block", "third", "share"), (q, qid, name, block_of(name), thirds[i], shares[i])):
                lt[col].append(value)
        by_third, rho = third_shares(shares, thirds), third_rank_agreement(shown, thirds)
        tt["query_index"].append(q)
        tt["query_id"].append(qid)
        for t in THIRDS:
            tt[f"share_{t}"].append(by_third[t])
            tt[f"spearman_{t}"].append(rho[t])
    return lt, tt


def spurious_columns(top: dict[str, Any], tokens: dict[str, Any], k: int | None) -> dict[str, list]:
    """One row per shown sequence: ‖a‖₂/‖a‖₁ of its per-token scores and the paper's 2/3 flag.

    Args:
        top: top.parquet columns query_index, seq_index, rank.
        tokens: tokens.parquet columns query_index, seq_index, score.
        k: shown sequences kept per end (None = all).
    """
    span = int(max(np.max(top["seq_index"], initial=0), np.max(tokens["seq_index"], initial=0))) + 1
    token_keys = np.asarray(tokens["query_index"], np.int64) * span + tokens["seq_index"]
    order = np.argsort(token_keys, kind="stable")
    keys, starts = np.unique(token_keys[order], return_index=True)
    ratios = grouped_l2_l1(np.asarray(tokens["score"], np.float64)[order], starts)
    kept = _shown(top, k)
    top_keys = np.asarray(top["query_index"][kept], np.int64) * span + top["seq_index"][kept]
    l2_l1 = np.full(top_keys.size, np.nan)  # a sequence without token rows has no ratio
    if keys.size:
        found = np.minimum(np.searchsorted(keys, top_keys), keys.size - 1)
        hit = keys[found] == top_keys
        l2_l1[hit] = ratios[found[hit]]
    return {
        "query_index": top["query_index"][kept].tolist(),
        "seq_index": top["seq_index"][kept].tolist(),
        "rank": top["rank"][kept].tolist(),
        "l2_l1": l2_l1.tolist(),
        "spurious": is_spurious(l2_l1).tolist(),
    }


__all__ = ["SCHEMAS", "sparsity_columns", "layer_columns", "spurious_columns"]
