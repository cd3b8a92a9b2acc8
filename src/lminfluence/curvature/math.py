"""The curvature maths as pure functions on tensors (docs/method.md §3–4).

Shapes: B sequences, T positions, I = in-features (+1 for bias), O = out-features,
Q queries. ā is ``a`` [B, T, I], the output-gradient is ``ds`` [B, T, O].
"""

from __future__ import annotations

import torch

# Largest [chunk, O, I] intermediate built at once, in elements (64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24


def batch_chunks(batch: int, per_item: int, budget: int = CHUNK_ELEMENTS) -> list[slice]:
    """Slices of range(batch) whose [chunk, per_item] blocks stay under ``budget`` elements."""
    step = max(1, budget // max(per_item, 1))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def sequence_gradients(a: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """Per-sequence weight gradients DW_b = Σ_t ds_t ā_tᵀ, [B, O, I]."""
    return torch.bmm(ds.transpose(1, 2), a)  # [B, O, T] @ [B, T, I]


def token_covariance(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """Σ over all positions of x_t x_tᵀ (products in x's dtype, result float64), [D, D], upper block triangle only.

    For D ≥ 512 the matrix is cut into ``blocks`` × ``blocks`` tiles and only the
    tiles on and above the diagonal are computed (10 of 16 GEMM tiles for 4
    blocks); the rest is left zero. ``symmetrize`` restores the full matrix
    from a sum of such results.
    """
    flat = x.reshape(-1, x.shape[-1])  # [B·T, D]
    D = flat.shape[1]
    if D < 512:
        return (flat.T @ flat).double()
    out = torch.zeros(D, D, dtype=torch.float64, device=x.device)
    step = -(-D // blocks)
    for i in range(0, D, step):
        out[i : i + step, i:] = flat[:, i : i + step].T @ flat[:, i:]
    return out


def symmetrize(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``upper``'s."""
    return torch.triu(upper) + torch.triu(upper, 1).T


def eigh64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition in float64 of a symmetric PSD matrix; round-off negatives set to 0."""
    evals, evecs = torch.linalg.eigh(matrix.double())
    return evals.clamp_min(0.0), evecs.contiguous()  # row-major, as it will be after a save and load


def rotated_gradients(
    a: torch.Tensor, ds: torch.Tensor, q_a: torch.Tensor | None, q_s: torch.Tensor | None
) -> torch.Tensor:
    """Q_Sᵀ DW_b Q_A for every sequence, [B, O, I] (DW_b itself when the bases are None).

    The rotation is applied to the tokens, (ds Q_S)ᵀ(ā Q_A), or to each sequence's
    gradient, Q_Sᵀ (dsᵀā) Q_A, whichever costs fewer products; no Kronecker
    product is formed.
    """
    if q_a is None:
        return sequence_gradients(a, ds)
    T, I, O = a.shape[1], a.shape[2], ds.shape[2]
    if T * (O * O + I * I) <= O * I * (O + I):
        return sequence_gradients(a @ q_a, ds @ q_s)
    return q_s.T @ sequence_gradients(a, ds) @ q_a


def eigenbasis_squares(
    a: torch.Tensor, ds: torch.Tensor, q_a: torch.Tensor | None, q_s: torch.Tensor | None
) -> torch.Tensor:
    """Σ_b (Q_Sᵀ DW_b Q_A)² over the batch (computed in a's dtype, summed in float64), [O, I] (Eq 20).

    ``q_a``/``q_s`` None means the parameter basis (the diagonal Fisher).
    """
    B, I, O = a.shape[0], a.shape[2], ds.shape[2]
    out = torch.zeros(O, I, dtype=torch.float64, device=a.device)
    for sl in batch_chunks(B, O * I):
        out.add_(rotated_gradients(a[sl], ds[sl], q_a, q_s).square_().sum(0))
    return out


def precondition(
    v: torch.Tensor,
    eigenvalues: torch.Tensor,
    damping: float,
    q_a: torch.Tensor | None = None,
    q_s: torch.Tensor | None = None,
) -> torch.Tensor:
    """P = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ for V [..., O, I] (Eq 21).

    With ``q_a``/``q_s`` None the basis is the parameter basis (diagonal).
    """
    denom = (eigenvalues + damping).to(v.dtype)
    if q_a is None:
        return v / denom
    qa, qs = q_a.to(v.dtype), q_s.to(v.dtype)
    return qs @ ((qs.T @ v @ qa) / denom) @ qa.T


def low_rank(p: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-R factors of each P [Q, O, I]: U [Q, O, R], σ [Q, R], V [Q, I, R] (§3.2.2).

    The top singular pairs come from the eigendecomposition of the small Gram
    matrix (min(O, I) square), in P's dtype, several times faster than a full
    SVD; the other side is recovered as P v_k / σ_k.
    """
    tall = p.shape[-2] >= p.shape[-1]
    m = p if tall else p.transpose(-1, -2)  # [Q, big, small]
    evals, evecs = torch.linalg.eigh(m.transpose(-1, -2) @ m)  # ascending
    small = evecs[..., -rank:].flip(-1)  # [Q, small, R]
    sigma = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()  # [Q, R]
    # directions with σ ≈ 0 (a query of fewer than R tokens) get zero factors, not 1/σ-sized noise
    alive = sigma > sigma[..., :1] * torch.finfo(p.dtype).eps * max(m.shape[-2:])
    big = torch.where(alive.unsqueeze(-2), (m @ small) / torch.where(alive, sigma, 1).unsqueeze(-2), 0)  # [Q, big, R]
    u, v = (big, small) if tall else (small, big)
    return u.contiguous(), sigma.contiguous(), v.contiguous()


__all__ = [
    "batch_chunks",
    "sequence_gradients",
    "token_covariance",
    "symmetrize",
    "eigh64",
    "rotated_gradients",
    "eigenbasis_squares",
    "precondition",
    "low_rank",
]
