"""Where in the network influence sits: layer shares and the lower / middle / upper thirds (docs/method.md §7).

Thirds are made of transformer blocks, the block number read from the module
name (``model.layers.5.mlp.up_proj`` → 5). With n distinct blocks in
increasing order, the block at position i (0-based) belongs to the third that
holds its centre: third = floor(3 (i + ½) / n). The split is symmetric and
never ties: 4 blocks split 1-2-1, 5 split 2-1-2, 6 split 2-2-2, 7 split 2-3-2,
8 split 3-2-3; 2 blocks go to the lower and upper thirds, 1 block to the
middle one. A tracked module without a block number (an embedding, the output
head) is a unit of its own, placed before the blocks when it comes before every
numbered module in the tracked order, after them otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..workflow.tables import block_of
from .stats import spearman

THIRDS = ("lower", "middle", "upper")


def layer_thirds(layers: Sequence[str]) -> list[str]:
    """The third ("lower", "middle" or "upper") of each tracked layer, in the given (model) order."""
    blocks = [block_of(name) for name in layers]
    first_numbered = next((i for i, b in enumerate(blocks) if b >= 0), len(blocks))

    def unit(i: int):
        if blocks[i] >= 0:
            return (1, blocks[i], "")
        return (0 if i < first_numbered else 2, 0, layers[i])

    units = sorted({unit(i) for i in range(len(layers))})
    position = {u: p for p, u in enumerate(units)}
    n = len(units)
    return [THIRDS[int(3 * (position[unit(i)] + 0.5) // n)] for i in range(len(layers))]


def layer_shares(per_layer: np.ndarray) -> np.ndarray:
    """Each layer's share of the summed score of some sequences (a query's top-k positive ones).

    Args:
        per_layer: [S, L] per-layer scores (Eq 30) of S sequences.

    Returns:
        [L] shares summing to 1; NaN when there is no sequence or the sum is not positive.
    """
    per_layer = np.asarray(per_layer, dtype=np.float64)
    summed = per_layer.sum(axis=0)
    total = summed.sum()
    if per_layer.shape[0] == 0 or not total > 0:
        return np.full(per_layer.shape[1], np.nan)
    return summed / total


def third_shares(shares: np.ndarray, thirds: Sequence[str]) -> dict[str, float]:
    """Sum of the layer shares within each third (0 for a third without layers; NaN shares stay NaN)."""
    names = np.asarray(thirds)
    values = np.asarray(shares, dtype=np.float64)
    return {t: float(values[names == t].sum()) for t in THIRDS}


def third_rank_agreement(per_layer: np.ndarray, thirds: Sequence[str]) -> dict[str, float]:
    """Spearman correlation between ranking sequences by the full score and by one third's score.

    The full score is the sum over all layers (Eq 30); a third's score is the
    sum over its layers only, i.e. the score the sequence would get if only
    that third were tracked (the paper's restricted re-scoring).

    Args:
        per_layer: [S, L] per-layer scores of a query's shown sequences.
        thirds: [L] the third of each layer.

    Returns:
        third → correlation; NaN with fewer than 3 sequences or a third without layers.
    """
    scores = np.asarray(per_layer, dtype=np.float64)
    names = np.asarray(thirds)
    full = scores.sum(axis=1)
    out = {}
    for t in THIRDS:
        cols = names == t
        out[t] = spearman(full, scores[:, cols].sum(axis=1)) if cols.any() else float("nan")
    return out


__all__ = ["layer_thirds", "layer_shares", "third_shares", "third_rank_agreement", "THIRDS"]
