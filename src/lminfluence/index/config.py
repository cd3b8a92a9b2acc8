"""The gradient index's settings: which compression, how small, stored how (docs/index.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..config import Serializable, check_choice, check_number, option
from ..errors import ConfigError

Method = Literal["eigen", "eigen_topk", "svd", "whitened_svd", "random", "full"]
StorageDtype = Literal["float16", "bfloat16", "float32", "float64"]

METHODS: tuple[str, ...] = get_args(Method)
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class IndexConfig(Serializable):
    """How each training sequence's gradient is compressed and stored.

    Attributes:
        method: what is kept of each sequence's per-layer gradient DW (O × I):
            ``eigen``: the coordinates of R = Q_Sᵀ DW Q_A (the EK-FAC eigenbasis)
            where the fitted eigenvalues Λ are largest, the same coordinates for
            every sequence (exact on the kept subspace);
            ``eigen_topk`` (the default: the most faithful at equal size in
            docs/index.md's measurements): each sequence's own largest coordinates
            of R, weighted by what they add to a preconditioned inner product, with
            their positions;
            ``svd``: the best rank-r factorisation of DW;
            ``random``: a Kronecker-structured Gaussian projection Π_out DW Π_inᵀ
            (LoGra's), the preconditioned query projected the same way;
            ``full``: R itself, nothing dropped (exact; large).
        reduction: the stored size is 1/reduction of the full gradient at the
            same dtype, per layer (ignored by ``full``).
        dtype: the coefficients' storage type; float16 values carry one float32
            scale per sequence and layer.
        damping_scale: relative damping of the weights ``eigen_topk`` ranks
            coordinates by (the scoring damping may differ).
        seed: seed of ``random``'s projections.
        shard_mib: target size of one shard file (the unit of resuming).
    """

    method: Method = option("eigen_topk", "compression: eigen_topk, eigen, svd, whitened_svd, random or full (exact); docs/index.md compares them")
    reduction: float = option(50.0, "store 1/reduction of each sequence's gradient (not used by full)")
    dtype: StorageDtype = option("float16", "storage type of the coefficients: float16, bfloat16, float32, float64")
    damping_scale: float = option(0.1, "relative damping of eigen_topk's selection weights")
    seed: int = option(0, "seed of the random projections (method random)")
    shard_mib: float = option(256.0, "target size of one shard file in MiB")

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("dtype", self.dtype, STORAGE_DTYPES)
        check_number("reduction", self.reduction, minimum=1.0)
        check_number("damping_scale", self.damping_scale, strict=True)
        check_number("shard_mib", self.shard_mib, strict=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


__all__ = ["IndexConfig", "METHODS", "STORAGE_DTYPES", "ITEMSIZE", "Method", "StorageDtype"]
