"""The curvature maths as pure functions on tensors (docs/method.md §3–4).

Shapes: B sequences, T positions, I = in-features (+1 for bias), O = out-features,
Q queries, R rank. ā is ``a`` [B, T, I], the output-gradient is ``ds`` [B, T, O].

An eigenbasis (Q_A or Q_S) is an orthogonal matrix given as its diagonal
blocks: one tensor (dense), or a tuple of square tensors (block-diagonal,
Appendix A of the paper: the covariance split into independent blocks of
consecutive coordinates). ``None`` stands for the identity (the parameter
basis of the diagonal Fisher). ``right``, ``right_t``, ``left`` and ``left_t``
multiply by such a basis without ever forming the block-diagonal matrix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

# Largest [chunk, O, I] intermediate built at once, in elements (64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24

Basis = torch.Tensor | tuple[torch.Tensor, ...]

# Randomised low-rank factorisation (Halko, Martinsson & Tropp 2011, Alg. 4.4): extra
# sample directions beyond the rank, and power iterations (each one M Mᵀ product).
OVERSAMPLE = 16
POWER_ITERATIONS = 2
SKETCH_SEED = 0x5EED


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run LAPACK factorisations (eigh, QR) on one CPU thread.

    They issue thousands of small parallel regions; with OpenMP's passive wait
    policy (which the project sets so that idle threads do not spin on shared
    machines) each region pays a wake-up, and on a busy 2-core machine two
    threads ran eigh and QR 3-4 times slower than one. Matrix products keep
    every thread.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _qr(y: torch.Tensor) -> torch.Tensor:
    if y.device.type != "cpu":
        return torch.linalg.qr(y).Q
    with one_thread():
        return torch.linalg.qr(y).Q


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if m.device.type != "cpu":
        return torch.linalg.eigh(m)
    with one_thread():
        return torch.linalg.eigh(m)


def batch_chunks(batch: int, per_item: int, budget: int = CHUNK_ELEMENTS) -> list[slice]:
    """Slices of range(batch) whose [chunk, per_item] blocks stay under ``budget`` elements."""
    step = max(1, budget // max(per_item, 1))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def block_slices(dim: int, blocks: int) -> list[slice]:
    """``min(blocks, dim)`` consecutive ranges covering range(dim), sizes differing by at most one (larger first)."""
    blocks = max(1, min(blocks, dim))
    size, extra = divmod(dim, blocks)
    out, start = [], 0
    for b in range(blocks):
        stop = start + size + (b < extra)
        out.append(slice(start, stop))
        start = stop
    return out


def as_blocks(q: Basis) -> tuple[torch.Tensor, ...]:
    """The diagonal blocks of a basis (one for a dense basis)."""
    return q if isinstance(q, tuple) else (q,)


def basis_dim(q: Basis) -> int:
    """The size of the space a basis spans."""
    return sum(b.shape[0] for b in as_blocks(q))


def basis_cost(q: Basis | None, dim: int) -> int:
    """Multiply-adds per row of applying the basis: Σ d_b² (d² when dense)."""
    return dim if q is None else sum(b.shape[0] ** 2 for b in as_blocks(q))


def basis_to(q: Basis | None, **kwargs) -> Basis | None:
    """The basis with every block moved/cast by ``Tensor.to(**kwargs)``."""
    if q is None or isinstance(q, torch.Tensor):
        return None if q is None else q.to(**kwargs)
    return tuple(b.to(**kwargs) for b in q)


def dense_basis(q: Basis) -> torch.Tensor:
    """The full matrix of a basis (block-diagonal when given in blocks); for tests and small layers."""
    return q if isinstance(q, torch.Tensor) else torch.block_diag(*q)


def _apply_last(x: torch.Tensor, q: Basis | None, transpose: bool) -> torch.Tensor:
    """The product x Q (or x Qᵀ) along the last axis of x; None is the identity."""
    if q is None:
        return x
    if isinstance(q, torch.Tensor):
        return x @ (q.T if transpose else q)
    parts, start = [], 0
    for b in q:
        d = b.shape[0]
        parts.append(x[..., start : start + d] @ (b.T if transpose else b))
        start += d
    return torch.cat(parts, dim=-1)


def right(x: torch.Tensor, q: Basis | None) -> torch.Tensor:
    """The product x Q, along x's last axis."""
    return _apply_last(x, q, False)


def right_t(x: torch.Tensor, q: Basis | None) -> torch.Tensor:
    """The product x Qᵀ, along x's last axis."""
    return _apply_last(x, q, True)


def left(q: Basis | None, m: torch.Tensor) -> torch.Tensor:
    """Q m, along m's second-to-last axis."""
    return _apply_last(m.transpose(-1, -2), q, True).transpose(-1, -2)


def left_t(q: Basis | None, m: torch.Tensor) -> torch.Tensor:
    """Qᵀ m, along m's second-to-last axis."""
    return _apply_last(m.transpose(-1, -2), q, False).transpose(-1, -2)


def sequence_gradients(a: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """Per-sequence weight gradients DW_b = Σ_t ds_t ā_tᵀ, [B, O, I]."""
    return torch.bmm(ds.transpose(1, 2), a)  # [B, O, T] @ [B, T, I]


PANELS = 4  # row panels of a covariance computed above its diagonal (10 of 16 tiles' products for 4)
PANEL_MIN_DIM = 512  # below this one full product is as fast


def token_covariance(x: torch.Tensor) -> torch.Tensor:
    """Σ over all positions of x_t x_tᵀ, [D, D], one matrix product in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])  # [B·T, D]
    return flat.T @ flat


_PANELS: dict[tuple[int, str], list[tuple[int, int, torch.Tensor]]] = {}


def _panel_index(dim: int, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    """For each row panel [r0, r1) × [r0, D): its bounds and the flat positions of its upper-triangle entries."""
    key = (dim, str(device))
    if key not in _PANELS:
        step = -(-dim // PANELS)
        panels = []
        for r0 in range(0, dim, step):
            r1, width = min(r0 + step, dim), dim - r0
            rows, cols = torch.triu_indices(r1 - r0, width, device=device)  # local row ρ, local col ≥ ρ
            panels.append((r0, r1, rows * width + cols))
        _PANELS[key] = panels
    return _PANELS[key]


def packed_covariance(x: torch.Tensor) -> torch.Tensor:
    """The upper triangle of Σ_t x_t x_tᵀ, packed row by row (``pack_upper``'s layout), [D(D+1)/2], in x's dtype.

    For D ≥ ``PANEL_MIN_DIM`` only row panels on and above the diagonal are
    multiplied (10/16 of a full product for 4 panels), each then packed.
    """
    flat = x.reshape(-1, x.shape[-1])  # [B·T, D]
    D = flat.shape[1]
    if D < PANEL_MIN_DIM:
        return pack_upper(flat.T @ flat)
    parts = []
    for r0, r1, index in _panel_index(D, flat.device):
        panel = flat[:, r0:r1].T @ flat[:, r0:]  # [r1 - r0, D - r0]
        parts.append(panel.reshape(-1).index_select(0, index))
    return torch.cat(parts)


def block_covariances(x: torch.Tensor, blocks: int) -> tuple[torch.Tensor, ...]:
    """``packed_covariance`` of each block of consecutive coordinates of x [..., D] (one block: the full matrix)."""
    slices = block_slices(x.shape[-1], blocks)
    if len(slices) == 1:
        return (packed_covariance(x),)
    return tuple(packed_covariance(x[..., s]) for s in slices)


def symmetrize(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``upper``'s (exact symmetry for eigh)."""
    return torch.triu(upper) + torch.triu(upper, 1).T


_UPPER: dict[tuple[int, str], torch.Tensor] = {}


def _upper_index(dim: int, device: torch.device) -> torch.Tensor:
    """Row-major flat positions of the upper triangle (diagonal included) of a dim × dim matrix."""
    key = (dim, str(device))
    if key not in _UPPER:
        rows, cols = torch.triu_indices(dim, dim, device=device)
        _UPPER[key] = rows * dim + cols
    return _UPPER[key]


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a symmetric [D, D] matrix, row by row, [D(D+1)/2].

    The running sums of A and S are kept packed: half the memory of the full matrices.
    """
    return matrix.reshape(-1).index_select(0, _upper_index(matrix.shape[0], matrix.device))


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric [D, D] matrix of a ``pack_upper`` triangle."""
    dim = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    full = torch.zeros(dim * dim, dtype=packed.dtype, device=packed.device)
    full[_upper_index(dim, packed.device)] = packed
    return symmetrize(full.view(dim, dim))


def eigh64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition in float64 of a symmetric PSD matrix; round-off negatives set to 0."""
    evals, evecs = torch.linalg.eigh(matrix.double())  # callers choose the threads (eigh_many)
    return evals.clamp_min(0.0), evecs.contiguous()  # row-major, as it will be after a save and load


def eigh_many(matrices: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``eigh64`` of each matrix.

    On the CPU, each eigendecomposition runs on one thread and as many run at
    once as torch has threads: LAPACK's eigensolvers scale poorly across
    threads, and on a busy machine two-thread ones ran four times slower than
    one-thread ones (results are the same).
    """
    if not matrices or matrices[0].device.type != "cpu":
        return [eigh64(m) for m in matrices]
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    with one_thread():
        if len(matrices) == 1 or threads == 1:
            return [eigh64(m) for m in matrices]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(eigh64, matrices))


def eigh_blocks(sums: tuple[torch.Tensor, ...], count: int, dtype: torch.dtype) -> tuple[torch.Tensor, Basis]:
    """Eigenvalues [D] and eigenbasis (blocks) of the mean covariance Σ/count (packed sums), decomposed in float64, stored in ``dtype``."""
    evals, bases = [], []
    for e, q in eigh_many([unpack_symmetric(s) / count for s in sums]):
        evals.append(e.to(dtype))
        bases.append(q.to(dtype))
    return torch.cat(evals), bases[0] if len(bases) == 1 else tuple(bases)


def rotates_tokens(T: int, I: int, O: int, q_a: Basis | None, q_s: Basis | None) -> bool:
    """Whether rotating each token, (ds Q_S)ᵀ(ā Q_A), costs fewer products than each sequence's gradient, Q_Sᵀ (dsᵀā) Q_A."""
    if q_a is None:
        return False
    ca, cs = basis_cost(q_a, I), basis_cost(q_s, O)
    return T * (ca + cs) <= O * ca + I * cs


def rotated_gradients(
    a: torch.Tensor, ds: torch.Tensor, q_a: Basis | None, q_s: Basis | None, a_rotated: torch.Tensor | None = None
) -> torch.Tensor:
    """Q_Sᵀ DW_b Q_A for every sequence, [B, O, I] (DW_b itself when the bases are None).

    The rotation is applied to the tokens, (ds Q_S)ᵀ(ā Q_A), or to each sequence's
    gradient, Q_Sᵀ (dsᵀā) Q_A, whichever costs fewer products (``rotates_tokens``);
    no Kronecker product is formed. ``a_rotated``: ā Q_A when already computed.
    """
    if q_a is None:
        return sequence_gradients(a, ds)
    if rotates_tokens(a.shape[1], a.shape[2], ds.shape[2], q_a, q_s):
        return sequence_gradients(right(a, q_a) if a_rotated is None else a_rotated, right(ds, q_s))
    return right(left_t(q_s, sequence_gradients(a, ds)), q_a)


def eigenbasis_squares(
    a: torch.Tensor, ds: torch.Tensor, q_a: Basis | None, q_s: Basis | None, a_rotated: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_b (Q_Sᵀ DW_b Q_A)² over the batch (computed in a's dtype, summed in float64), [O, I] (Eq 20).

    ``q_a``/``q_s`` None means the parameter basis (the diagonal Fisher).
    ``a_rotated``: ā Q_A, when the caller shares it between layers that read the same ā.
    """
    B, I, O = a.shape[0], a.shape[2], ds.shape[2]
    out = torch.zeros(O, I, dtype=torch.float64, device=a.device)
    for sl in batch_chunks(B, O * I):
        ar = None if a_rotated is None else a_rotated[sl]
        out.add_(rotated_gradients(a[sl], ds[sl], q_a, q_s, ar).square_().sum(0))
    return out


def precondition(
    v: torch.Tensor,
    eigenvalues: torch.Tensor,
    damping: float,
    q_a: Basis | None = None,
    q_s: Basis | None = None,
) -> torch.Tensor:
    """P = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ for V [..., O, I] (Eq 21).

    With ``q_a``/``q_s`` None the basis is the parameter basis (diagonal).
    """
    denom = (eigenvalues + damping).to(v.dtype)
    if q_a is None:
        return v / denom
    qa, qs = basis_to(q_a, dtype=v.dtype), basis_to(q_s, dtype=v.dtype)
    return right_t(left(qs, right(left_t(qs, v), qa) / denom), qa)


def _top_pairs(m: torch.Tensor, small_side: torch.Tensor, evals: torch.Tensor, rank: int):
    """Top-``rank`` singular triplets of m [Q, big, small] from the eigenpairs (ascending) of a Gram matrix."""
    small = small_side[..., -rank:].flip(-1)  # [Q, small, R]
    sigma = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()  # [Q, R]
    # directions with σ ≈ 0 (a query of fewer than R tokens) get zero factors, not 1/σ-sized noise
    alive = sigma > sigma[..., :1] * torch.finfo(m.dtype).eps * max(m.shape[-2:])
    big = torch.where(alive.unsqueeze(-2), (m @ small) / torch.where(alive, sigma, 1).unsqueeze(-2), 0)  # [Q, big, R]
    return big, sigma, small


def low_rank(p: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-R factors of each P [Q, O, I]: U [Q, O, R], σ [Q, R], V [Q, I, R] (§3.2.2).

    The top singular pairs come from the eigendecomposition of the small Gram
    matrix (min(O, I) square), in P's dtype, several times faster than a full
    SVD; the other side is recovered as P v_k / σ_k. Exact (to round-off).
    """
    tall = p.shape[-2] >= p.shape[-1]
    m = p if tall else p.transpose(-1, -2)  # [Q, big, small]
    evals, evecs = _eigh(m.transpose(-1, -2) @ m)  # ascending
    big, sigma, small = _top_pairs(m, evecs, evals, rank)
    u, v = (big, small) if tall else (small, big)
    return u.contiguous(), sigma.contiguous(), v.contiguous()


def low_rank_sketched(
    p: torch.Tensor, rank: int, oversample: int = OVERSAMPLE, power_iterations: int = POWER_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-R factors of each P [Q, O, I] by a randomised range finder with power iterations.

    Halko, Martinsson & Tropp (2011), Algorithms 4.4 and 5.1: Y = (M Mᵀ)^q M Ω with
    a Gaussian Ω of R + ``oversample`` columns (fixed seed: deterministic),
    re-orthonormalised between products; then the exact SVD of the small
    projection Q_Yᵀ M. Costs (2q + 2) products M·[small, R + p] instead of the
    Gram matrix (big · small²) and its eigendecomposition (small³), which
    dominate ``low_rank`` for wide layers. Its error against the best rank-R
    approximation shrinks like (σ_{R+p+1}/σ_R)^(2q+1); tests and the real-model
    benchmark measure it.
    """
    tall = p.shape[-2] >= p.shape[-1]
    m = p if tall else p.transpose(-1, -2)  # [Q, big, small]
    k = min(rank + oversample, m.shape[-1])
    g = torch.Generator(device="cpu").manual_seed(SKETCH_SEED)
    omega = torch.randn(m.shape[-1], k, generator=g, dtype=torch.float64).to(device=m.device, dtype=m.dtype)
    y = m @ omega  # [Q, big, k]
    for _ in range(power_iterations):
        y = _qr(y)
        z = _qr(m.transpose(-1, -2) @ y)  # [Q, small, k]
        y = m @ z
    basis = _qr(y)  # [Q, big, k]
    b = basis.transpose(-1, -2) @ m  # [Q, k, small]
    evals, evecs = _eigh(b @ b.transpose(-1, -2))  # [Q, k, k], ascending
    # b = W Σ Vᵀ: the right factors are bᵀ w / σ, the left ones basis · w
    small, sigma, w = _top_pairs(b.transpose(-1, -2), evecs, evals, rank)  # small [Q, small, R], w [Q, k, R]
    big = basis @ w  # [Q, big, R]
    u, v = (big, small) if tall else (small, big)
    return u.contiguous(), sigma.contiguous(), v.contiguous()


def factorize(p: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-R factors of P [Q, O, I].

    Exact (``low_rank``) when the small side is at most twice the sketch size,
    where the Gram eigendecomposition is cheap; sketched (``low_rank_sketched``) otherwise.
    """
    if min(p.shape[-2:]) <= 2 * (rank + OVERSAMPLE):
        return low_rank(p, rank)
    return low_rank_sketched(p, rank)


__all__ = [
    "Basis",
    "batch_chunks",
    "block_slices",
    "as_blocks",
    "basis_dim",
    "basis_to",
    "dense_basis",
    "right",
    "right_t",
    "left",
    "left_t",
    "sequence_gradients",
    "token_covariance",
    "packed_covariance",
    "block_covariances",
    "symmetrize",
    "pack_upper",
    "unpack_symmetric",
    "eigh64",
    "eigh_many",
    "eigh_blocks",
    "rotates_tokens",
    "rotated_gradients",
    "eigenbasis_squares",
    "precondition",
    "low_rank",
    "low_rank_sketched",
    "factorize",
]
