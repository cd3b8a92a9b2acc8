"""The curvature maths as pure functions on tensors (METHOD.md §3–4).

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


def token_covariance(x: torch.Tensor) -> torch.Tensor:
    """Σ over all positions of x_t x_tᵀ, accumulated in float64, [D, D]."""
    flat = x.reshape(-1, x.shape[-1])  # [B·T, D]
    return (flat.T @ flat).double()


def eigh64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition in float64 of a symmetric PSD matrix; round-off negatives set to 0."""
    m = matrix.double()
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return evals.clamp_min(0.0), evecs.contiguous()  # row-major, as it will be after a save and load


def eigenbasis_squares(
    a: torch.Tensor, ds: torch.Tensor, q_a: torch.Tensor | None, q_s: torch.Tensor | None
) -> torch.Tensor:
    """Σ_b (Q_Sᵀ DW_b Q_A)² over the batch, in float64, [O, I] (EK-FAC Eq 20).

    ``q_a``/``q_s`` None means the parameter basis (the diagonal Fisher). The
    rotation is applied to the tokens, R_b = (ds Q_S)ᵀ(ā Q_A), or to each
    sequence's gradient, R_b = Q_Sᵀ (dsᵀā) Q_A, whichever costs fewer products;
    no Kronecker product is formed.
    """
    B, T, I = a.shape
    O = ds.shape[-1]
    out = torch.zeros(O, I, dtype=torch.float64, device=a.device)
    rotate_tokens = q_a is not None and T * (O * O + I * I) <= O * I * (O + I)
    if rotate_tokens:
        a = a @ q_a.to(a.dtype)  # [B, T, I]
        ds = ds @ q_s.to(ds.dtype)  # [B, T, O]
    for sl in batch_chunks(B, O * I):
        r = sequence_gradients(a[sl], ds[sl])  # [b, O, I]
        if q_a is not None and not rotate_tokens:
            r = q_s.to(r.dtype).T @ r @ q_a.to(r.dtype)
        out += r.square().sum(0).double()
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
    dtype = v.dtype
    denom = (eigenvalues + damping).to(dtype)
    if q_a is None:
        return v / denom
    qa, qs = q_a.to(dtype), q_s.to(dtype)
    return qs @ ((qs.T @ v @ qa) / denom) @ qa.T


def low_rank(p: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-R factors of each P [Q, O, I]: U [Q, O, R], σ [Q, R], V [Q, I, R] (§3.2.2)."""
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    return u[..., :rank].contiguous(), s[..., :rank].contiguous(), vh[..., :rank, :].transpose(-1, -2).contiguous()


__all__ = [
    "batch_chunks",
    "sequence_gradients",
    "token_covariance",
    "eigh64",
    "eigenbasis_squares",
    "precondition",
    "low_rank",
]
