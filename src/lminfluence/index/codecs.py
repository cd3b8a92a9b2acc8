"""The compressions of a sequence's per-layer gradient, and the preconditioned inner product from each.

For one tracked layer, a training sequence's gradient is DW = Σ_t ds_t ā_tᵀ
(O × I) and a query's preconditioned gradient is P = Q_S M Q_Aᵀ with
M = (Q_Sᵀ V Q_A) ⊘ (Λ + λ) (Eq 21). The score is

    ⟨P, DW⟩ = Σ M ⊙ R,    R = Q_Sᵀ DW Q_A     (the EK-FAC eigenbasis)

A codec stores a small representation of DW per sequence (``encode``) and
turns a query into the matching small representation (``prepare``) so that
``score`` approximates ⟨P, DW⟩ (docs/index.md):

- ``eigen``: R at fixed coordinates, those of the largest Λ; exact on them.
- ``eigen_topk``: each sequence's k coordinates of R with the largest
  R² Λ / (Λ + λ)² (the expected square of their term for a query whose
  eigenbasis coordinates have second moments Λ), values and positions.
- ``svd``: the best rank-r factors of DW (Eckart–Young), rotated into the eigenbasis.
- ``random``: Π_out DW Π_inᵀ with Gaussian Π of variance 1/k (E[ΠᵀΠ] = I), and
  the query as Π_out P Π_inᵀ: an unbiased estimate of ⟨P, DW⟩.
- ``full``: R itself.

Shapes: B sequences, T positions, O × I the layer, Q queries, k kept values, r rank.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..curvature import math as cm
from ..curvature.base import Curvature
from ..errors import CorruptFileError


@dataclass
class LayerBasis:
    """One layer's EK-FAC eigenbasis in the compute dtype and device.

    Q_A [I, I], Q_S [O, O] (None: the
    parameter basis, as for the diagonal strategy) and Λ [O, I].
    """

    q_a: torch.Tensor | None
    q_s: torch.Tensor | None
    lam: torch.Tensor

    @classmethod
    def of(cls, curvature: Curvature, name: str, like: torch.Tensor) -> LayerBasis:
        q_a, q_s = curvature.bases(name, like)
        lam = curvature.state[name]["lambda"].to(device=like.device, dtype=like.dtype)
        return cls(dense(q_a), dense(q_s), lam)

    def rotate(self, a: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """R = Q_Sᵀ DW Q_A per sequence, [B, O, I]."""
        return cm.rotated_gradients(a, ds, self.q_a, self.q_s)

    def to_parameters(self, m: torch.Tensor) -> torch.Tensor:
        """Q_S M Q_Aᵀ for M [..., O, I] in the eigenbasis."""
        return m if self.q_a is None or self.q_s is None else self.q_s @ m @ self.q_a.T


def dense(q: cm.Basis | None) -> torch.Tensor | None:
    """A basis as one matrix: block-diagonal factors (``FactorConfig.blocks``) come as a tuple of blocks, in order."""
    return torch.block_diag(*q) if isinstance(q, tuple) else q


class QueryGradients:
    """One batch of queries' captures, with M (eigenbasis) and P (parameter basis) computed when first asked for."""

    def __init__(self, a: torch.Tensor, ds: torch.Tensor, basis: LayerBasis, damping: float) -> None:
        self.a, self.ds, self.basis, self.damping = a, ds, basis, damping
        self._m: torch.Tensor | None = None
        self._p: torch.Tensor | None = None

    @property
    def m(self) -> torch.Tensor:
        """(Q_Sᵀ V Q_A) ⊘ (Λ + λ), [Q, O, I] (Eq 21 before the rotation back)."""
        if self._m is None:
            self._m = self.basis.rotate(self.a, self.ds) / (self.basis.lam + self.damping)
        return self._m

    @property
    def p(self) -> torch.Tensor:
        """P = (G + λI)⁻¹ V in the parameter basis, [Q, O, I]."""
        if self._p is None:
            self._p = self.basis.to_parameters(self.m)
        return self._p


def _dot(prepared: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return prepared @ values.to(prepared.dtype).T  # [Q, d] @ [d, n]


class Codec:
    """One compression for one layer of O × I. Subclasses set their sizes in ``__init__``."""

    method: ClassVar[str]

    def __init__(self, out_dim: int, in_dim: int, reduction: float, itemsize: int) -> None:
        self.out_dim, self.in_dim = out_dim, in_dim
        self.budget = out_dim * in_dim * itemsize / reduction  # bytes per sequence for this layer

    def sizes(self) -> dict[str, int]:
        """The kept sizes (k, r, …), for the manifest."""
        return {}

    def bytes_per_sequence(self, itemsize: int, scaled: bool) -> int:
        raise NotImplementedError

    def setup(self, lam: torch.Tensor, selection_damping: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Tensors fixed for the whole index (coordinates, projections), from Λ [O, I], a damping and a seeded generator."""
        return {}

    def encode(self, a: torch.Tensor, ds: torch.Tensor, basis: LayerBasis, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored arrays of each sequence of a capture (ā [B, T, I], ds [B, T, O]), leading dimension B."""
        raise NotImplementedError

    def prepare(self, query: QueryGradients, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """The queries in the form ``score`` contracts with the stored arrays."""
        raise NotImplementedError

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The prepared form of all queries from those of consecutive query batches."""
        return torch.cat(parts)

    def score(self, prepared: torch.Tensor, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """Approximate ⟨P_q, DW_z⟩ for every query and stored sequence, [Q, n]."""
        return _dot(prepared, arrays["values"])


class Full(Codec):
    """R = Q_Sᵀ DW Q_A, every coordinate (exact)."""

    method = "full"

    def bytes_per_sequence(self, itemsize: int, scaled: bool) -> int:
        return self.out_dim * self.in_dim * itemsize + 4 * scaled

    def encode(self, a, ds, basis, aux):
        return {"values": basis.rotate(a, ds).reshape(a.shape[0], -1)}  # [B, O·I]

    def prepare(self, query, aux):
        return query.m.reshape(query.m.shape[0], -1)  # [Q, O·I]


class Eigen(Codec):
    """R at the k coordinates of the largest Λ, the same for every sequence: exact on that subspace."""

    method = "eigen"

    def __init__(self, out_dim: int, in_dim: int, reduction: float, itemsize: int) -> None:
        super().__init__(out_dim, in_dim, reduction, itemsize)
        self.k = min(out_dim * in_dim, max(1, round(self.budget / itemsize)))

    def sizes(self) -> dict[str, int]:
        return {"k": self.k}

    def bytes_per_sequence(self, itemsize: int, scaled: bool) -> int:
        return self.k * itemsize + 4 * scaled

    def setup(self, lam, selection_damping, generator):
        order = torch.sort(lam.reshape(-1), descending=True, stable=True).indices  # ties: lower position first
        coords = order[: self.k].sort().values
        rows, cols = coords // self.in_dim, coords % self.in_dim
        used_rows, used_cols = rows.unique(), cols.unique()  # sorted
        return {
            "coords": coords,
            "rows": used_rows,
            "cols": used_cols,
            "row_pos": torch.searchsorted(used_rows, rows),
            "col_pos": torch.searchsorted(used_cols, cols),
        }

    def _block(self, a, ds, basis, aux) -> torch.Tensor:
        """R restricted to the kept coordinates' rows and columns, then gathered, [B, k]."""
        q_a = None if basis.q_a is None else basis.q_a[:, aux["cols"].to(a.device)]
        q_s = None if basis.q_s is None else basis.q_s[:, aux["rows"].to(a.device)]
        if q_a is None:  # parameter basis: the kept rows and columns of DW itself
            block = cm.sequence_gradients(a[..., aux["cols"].to(a.device)], ds[..., aux["rows"].to(a.device)])
        else:
            block = cm.rotated_gradients(a, ds, q_a, q_s)  # [B, rows, cols]
        return block[:, aux["row_pos"].to(a.device), aux["col_pos"].to(a.device)]

    def encode(self, a, ds, basis, aux):
        return {"values": self._block(a, ds, basis, aux)}

    def prepare(self, query, aux):
        lam = query.basis.lam.reshape(-1)[aux["coords"].to(query.a.device)]
        return self._block(query.a, query.ds, query.basis, aux) / (lam + query.damping)  # [Q, k]


class EigenTopk(Codec):
    """Each sequence's own k coordinates of R with the largest R² Λ / (Λ + λ)², and their positions.

    A position p (in O·I, ascending) is kept as its offset in its block of 2¹⁶ (int16, stored minus 2¹⁵)
    plus, per sequence, how many kept positions fall in each block (int32): 2 bytes per position
    instead of 4, so 1.5× more coordinates fit a float16 budget.
    """

    method = "eigen_topk"
    BLOCK = 1 << 16

    def __init__(self, out_dim: int, in_dim: int, reduction: float, itemsize: int) -> None:
        super().__init__(out_dim, in_dim, reduction, itemsize)
        self.blocks = -(-out_dim * in_dim // self.BLOCK)
        self.k = min(out_dim * in_dim, max(1, round((self.budget - 4 * self.blocks) / (itemsize + 2))))

    def sizes(self) -> dict[str, int]:
        return {"k": self.k}

    def bytes_per_sequence(self, itemsize: int, scaled: bool) -> int:
        return self.k * (itemsize + 2) + 4 * self.blocks + 4 * scaled

    def setup(self, lam, selection_damping, generator):
        lam = lam.reshape(-1)
        return {"weight": (lam / (lam + selection_damping) ** 2).float()}

    def select(self, r: torch.Tensor, aux: dict[str, torch.Tensor], k: int | None = None) -> torch.Tensor:
        """The positions kept of each R [B, O·I], largest weight first, [B, k]."""
        weight = aux["weight"].to(device=r.device, dtype=r.dtype)
        return torch.topk(r.square() * weight, k or self.k, dim=1, sorted=True).indices

    def arrays(self, r: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored arrays of R [B, O·I] at the positions idx [B, k] (any order)."""
        idx = idx.sort(dim=1).values
        block = idx // self.BLOCK
        count = torch.zeros(idx.shape[0], self.blocks, dtype=torch.int32, device=idx.device)
        count.scatter_add_(1, block, torch.ones_like(block, dtype=torch.int32))
        return {"values": r.gather(1, idx), "offset": (idx % self.BLOCK - (1 << 15)).to(torch.int16), "count": count}

    def positions(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """The positions in O·I of the stored values, [n, k] (int64)."""
        offset, count = arrays["offset"].long() + (1 << 15), arrays["count"].long()
        ends = count.cumsum(1)  # [n, blocks]
        slot = torch.arange(offset.shape[1], device=offset.device).expand_as(offset).contiguous()
        return torch.searchsorted(ends, slot, right=True) * self.BLOCK + offset

    def encode(self, a, ds, basis, aux):
        r = basis.rotate(a, ds).reshape(a.shape[0], -1)  # [B, O·I]
        return self.arrays(r, self.select(r, aux))

    def prepare(self, query, aux):
        return query.m.reshape(query.m.shape[0], -1).T.contiguous()  # [O·I, Q]: a position's Q values side by side

    def join(self, parts):
        return torch.cat(parts, dim=1)

    def score(self, prepared, arrays):
        """One sparse product per block of 2¹⁶ positions, so that the queries' rows it reads stay in cache.

        A sequence's kept positions are ascending, hence grouped by block; the entries are permuted
        block-major (block b of every sequence, sequence by sequence) and block b's entries, as a
        CSR matrix [n, 2¹⁶], multiply the queries' rows of block b (4 MB for 16 float32 queries).
        Reading rows at random over all of O·I instead is bound by memory latency: for SmolLM2's
        1536 × 576 layers (56 MB of rows) the product alone took 116 ms against 16 ms (4.4 M kept
        entries, 16 queries, one thread), the whole score 2.5 to 5× longer than this way. Half-precision
        queries are multiplied in float32 on the CPU (no CSR kernel there for them).
        """
        dtype = prepared.dtype
        if prepared.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            prepared = prepared.float()
        values, offset, count = arrays["values"].to(prepared.dtype), arrays["offset"], arrays["count"].long()
        n, k = values.shape
        device = prepared.device
        index_dtype = torch.int32 if n * k < 2**31 else torch.int64  # CSR indices: int32 unless they would overflow
        # entry t of the block-major order is entry perm[t] of the row-major (stored) one
        lens = count.T.reshape(-1)  # [blocks·n]: the length of each (block, sequence) segment
        seg_start = (count.cumsum(1) - count + torch.arange(n, device=device)[:, None] * k).T.reshape(-1)
        seg_first = lens.cumsum(0) - lens
        perm = torch.repeat_interleave(seg_start - seg_first, lens, output_size=n * k) + torch.arange(n * k, device=device)
        vals = values.reshape(-1)[perm]
        cols = offset.reshape(-1)[perm].to(index_dtype) + (1 << 15)
        del perm
        crows = torch.cat([torch.zeros(1, self.blocks, dtype=torch.int64, device=device), count.cumsum(0)]).to(index_dtype)
        totals = count.sum(0)
        firsts, sizes = (totals.cumsum(0) - totals).tolist(), totals.tolist()
        last = self.out_dim * self.in_dim - (self.blocks - 1) * self.BLOCK  # the last block may be shorter
        if sizes[-1] and int(cols[firsts[-1] :].max()) >= last:  # only a damaged file (whose checksums still match) gets here
            raise CorruptFileError(f"an eigen_topk position lies past the end of its {self.out_dim} × {self.in_dim} layer")
        out = torch.zeros(n, prepared.shape[1], dtype=prepared.dtype, device=device)
        for b, (first, total) in enumerate(zip(firsts, sizes)):
            if total == 0:
                continue
            rows = slice(b * self.BLOCK, min((b + 1) * self.BLOCK, prepared.shape[0]))
            part = slice(first, first + total)
            with warnings.catch_warnings():  # torch calls its CSR support "beta" on every first use; the result is tested
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
                block = torch.sparse_csr_tensor(
                    crows[:, b].contiguous(), cols[part], vals[part], size=(n, rows.stop - rows.start), check_invariants=False
                )
            out += block @ prepared[rows]
        return out.T.to(dtype)  # [Q, n]


class Svd(Codec):
    """DW ≈ U diag(σ) Vᵀ of rank r, the best such (Eckart–Young).

    Kept rotated into the eigenbasis
    (Q_Sᵀ U, Q_Aᵀ V: the same approximation of R = Q_Sᵀ DW Q_A, so queries contract with M).
    """

    method = "svd"

    def __init__(self, out_dim: int, in_dim: int, reduction: float, itemsize: int) -> None:
        super().__init__(out_dim, in_dim, reduction, itemsize)
        self.r = min(out_dim, in_dim, max(1, round(self.budget / ((out_dim + in_dim) * itemsize + 4))))

    def sizes(self) -> dict[str, int]:
        return {"r": self.r}

    def bytes_per_sequence(self, itemsize: int, scaled: bool) -> int:
        return self.r * ((self.out_dim + self.in_dim) * itemsize + max(itemsize, 4))

    def encode(self, a, ds, basis, aux):
        u, s, v = truncated_svd(a, ds, self.r)
        if basis.q_a is not None:
            u, v = basis.q_s.T @ u, basis.q_a.T @ v  # [B, O, r], [B, I, r]
        return {"u": u, "s": s, "v": v}

    def prepare(self, query, aux):
        return query.m.reshape(query.m.shape[0], -1)  # [Q, O·I]

    def score(self, prepared, arrays):
        u, s, v = (arrays[k].to(prepared.dtype) for k in ("u", "s", "v"))
        n, O, r = u.shape
        I = v.shape[1]
        out = []
        for sl in cm.batch_chunks(n, O * I):
            r_hat = (u[sl] * s[sl].unsqueeze(1)) @ v[sl].transpose(1, 2)  # [n', O, I]
            out.append(prepared @ r_hat.reshape(r_hat.shape[0], -1).T)
        return torch.cat(out, dim=1)


class WhitenedSvd(Svd):
    """The best rank-r factors of R' = diag(α) R diag(β).

    R is whitened by the Kronecker-structured weights αβᵀ
    closest to (Λ + λ)^(-1/2) (its leading singular pair): a low-rank fit in (nearly) the metric the
    preconditioned inner product measures, where the plain SVD spends its rank on high-curvature
    directions that preconditioning then divides away. Queries contract as M ⊘ (αβᵀ).
    """

    method = "whitened_svd"

    def setup(self, lam, selection_damping, generator):
        w = (lam + selection_damping).rsqrt()  # [O, I], positive
        alpha = torch.ones(lam.shape[0], dtype=lam.dtype)
        for _ in range(100):  # power iteration: the leading singular pair of a positive matrix is positive
            beta = w.T @ alpha
            beta /= beta.norm()
            alpha = w @ beta
        return {"alpha": alpha, "beta": beta}

    def _scales(self, aux, like):
        return (aux[k].to(device=like.device, dtype=like.dtype) for k in ("alpha", "beta"))

    def encode(self, a, ds, basis, aux):
        alpha, beta = self._scales(aux, a)
        a_rot = a if basis.q_a is None else a @ basis.q_a  # [B, T, I]: ā in the eigenbasis
        ds_rot = ds if basis.q_s is None else ds @ basis.q_s  # [B, T, O]
        u, s, v = truncated_svd(a_rot * beta, ds_rot * alpha, self.r)
        return {"u": u, "s": s, "v": v}

    def prepare(self, query, aux):
        alpha, beta = self._scales(aux, query.m)
        return (query.m / torch.outer(alpha, beta)).reshape(query.m.shape[0], -1)  # [Q, O·I]


def truncated_svd(a: torch.Tensor, ds: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r factors of DW_b = Σ_t ds_t ā_tᵀ: U [B, O, r], σ [B, r], V [B, I, r] (zero-padded past DW's rank).

    With fewer positions than min(O, I) it works on the tokens: DW = Xᵀ Y with X = ds, Y = ā; thin QR of
    Xᵀ and Yᵀ leaves a T × T core whose SVD gives DW's (never forming DW).
    """
    B, T, I = a.shape
    O = ds.shape[-1]
    if T < min(O, I):
        qx, rx = torch.linalg.qr(ds.transpose(1, 2))  # [B, O, T], [B, T, T]
        qy, ry = torch.linalg.qr(a.transpose(1, 2))  # [B, I, T], [B, T, T]
        uc, s, vch = torch.linalg.svd(rx @ ry.transpose(1, 2))  # core [B, T, T]
        u, v = qx @ uc, qy @ vch.transpose(1, 2)
    else:
        u, s, vch = torch.linalg.svd(cm.sequence_gradients(a, ds), full_matrices=False)
        v = vch.transpose(1, 2)
    k = min(r, s.shape[-1])
    pad = r - k
    u, s, v = u[..., :k], s[..., :k], v[..., :k]
    if pad:
        u, v = torch.nn.functional.pad(u, (0, pad)), torch.nn.functional.pad(v, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
    return u.contiguous(), s.contiguous(), v.contiguous()


class RandomProjection(Codec):
    """Π_out DW Π_inᵀ with Gaussian Π_out [k_o, O], Π_in [k_i, I] of variance 1/k (LoGra's Kronecker projection)."""

    method = "random"

    def __init__(self, out_dim: int, in_dim: int, reduction: float, itemsize: int) -> None:
        super().__init__(out_dim, in_dim, reduction, itemsize)
        shrink = math.sqrt(out_dim * in_dim * itemsize / max(self.budget, itemsize))
        self.k_out = min(out_dim, max(1, round(out_dim / shrink)))
        self.k_in = min(in_dim, max(1, round(in_dim / shrink)))

    def sizes(self) -> dict[str, int]:
        return {"k_out": self.k_out, "k_in": self.k_in}

    def bytes_per_sequence(self, itemsize: int, scaled: bool) -> int:
        return self.k_out * self.k_in * itemsize + 4 * scaled

    def setup(self, lam, selection_damping, generator):
        def gaussian(k: int, d: int) -> torch.Tensor:  # drawn in float64, kept in float32 (they are random anyway)
            return (torch.randn(k, d, generator=generator, dtype=torch.float64) / math.sqrt(k)).float()

        return {"proj_out": gaussian(self.k_out, self.out_dim), "proj_in": gaussian(self.k_in, self.in_dim)}

    def encode(self, a, ds, basis, aux):
        p_out, p_in = (aux[k].to(device=a.device, dtype=a.dtype) for k in ("proj_out", "proj_in"))
        return {"values": cm.sequence_gradients(a @ p_in.T, ds @ p_out.T).reshape(a.shape[0], -1)}  # [B, k_o·k_i]

    def prepare(self, query, aux):
        p = query.p
        p_out, p_in = (aux[k].to(device=p.device, dtype=p.dtype) for k in ("proj_out", "proj_in"))
        return (p_out @ p @ p_in.T).reshape(p.shape[0], -1)  # [Q, k_o·k_i]


CODECS: dict[str, type[Codec]] = {c.method: c for c in (Eigen, EigenTopk, Svd, WhitenedSvd, RandomProjection, Full)}


def make_codec(method: str, out_dim: int, in_dim: int, reduction: float, itemsize: int) -> Codec:
    """The codec of ``method`` for an O × I layer at 1/``reduction`` of its size in ``itemsize``-byte values."""
    return CODECS[method](out_dim, in_dim, reduction, itemsize)


# ---------------------------------------------------------------- storage types


def pack(arrays: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The arrays as stored: integers as they are, σ in float32 (float64 kept), the rest in ``dtype``.

    float16 ``values`` are divided by their largest magnitude per sequence, kept as ``scale`` (float32),
    so that small gradients neither underflow nor lose their relative precision.
    """
    out = {}
    for key, t in arrays.items():
        if not t.is_floating_point():
            out[key] = t.cpu().contiguous()
        elif key == "s":
            out[key] = t.to(torch.float64 if dtype == torch.float64 else torch.float32).cpu().contiguous()
        elif key == "values" and dtype == torch.float16:
            scale = t.abs().amax(dim=1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # [B]
            out[key] = (t / scale.unsqueeze(1)).to(dtype).cpu().contiguous()
            out["scale"] = scale.to(torch.float32).cpu().contiguous()
        else:
            out[key] = t.to(dtype).cpu().contiguous()
    return out


def unpack(arrays: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The inverse of ``pack``, floats in the compute ``dtype``."""
    out = {k: t if not t.is_floating_point() else t.to(dtype) for k, t in arrays.items() if k != "scale"}
    if "scale" in arrays:
        out["values"] = out["values"] * arrays["scale"].to(dtype).unsqueeze(1)
    return out


__all__ = ["LayerBasis", "QueryGradients", "Codec", "CODECS", "make_codec", "pack", "unpack", "truncated_svd"]
