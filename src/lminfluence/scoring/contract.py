"""Per-layer contractions between preconditioned queries and training captures (docs/method.md §5).

score(q, z) for one layer = Σ_t ds_tᵀ P_q ā_t. Two ways to compute it:

- materialise: DW_b = Σ_t ds_t ā_tᵀ per sequence, then ⟨P_q, DW_b⟩;
  cost B·T·O·I + B·Q·O·I, no per-token terms.
- project: per token, ds_tᵀ P_q ā_t directly; with P = U diag(σ) Vᵀ of rank R
  this is Σ_k σ_k (ds_t·u_k)(v_k·ā_t), cost B·T·(O+I)·R·Q; with a dense P,
  B·T·Q·O·I. Gives the per-token terms (Eq 31) for free.

Neither ever holds an [N, O·I] tensor: DW is built for one chunk of one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..curvature.base import Curvature
from ..curvature.math import CHUNK_ELEMENTS, batch_chunks, sequence_gradients

# Low-rank layers may be expanded to a dense [Q, O, I] for materialising only under this size (elements).
DENSE_QUERY_BUDGET = 1 << 26


@dataclass
class LayerQueries:
    """All queries' preconditioned gradients P for one layer, dense or rank-R.

    Attributes:
        dense: P as [Q, O, I], or None when only the factors are kept.
        u, s, v: P ≈ U diag(σ) Vᵀ with U [Q, O, R], σ [Q, R], V [Q, I, R].
    """

    dense: torch.Tensor | None = None
    u: torch.Tensor | None = None
    s: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @classmethod
    def precondition(
        cls, curvature: Curvature, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float, rank: int | None
    ) -> LayerQueries:
        """(G + λI)⁻¹ ∇g for each query of a capture, dense, or rank-``rank`` factors when that is smaller."""
        if rank is None or rank >= min(a.shape[-1], ds.shape[-1]):
            dense = curvature.precondition_captures(name, a, ds, damping)
            assert isinstance(dense, torch.Tensor)  # without a rank: one dense tensor
            return cls(dense=dense)
        u, s, w = curvature.precondition_captures(name, a, ds, damping, rank)
        return cls(u=u, s=s, v=w)

    @classmethod
    def concat(cls, parts: list[LayerQueries]) -> LayerQueries:
        """The queries of several parts, in order (one part is returned as it is, without a copy)."""
        if len(parts) == 1:
            return parts[0]

        def cat(name: str) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts)

        return cls(dense=cat("dense"), u=cat("u"), s=cat("s"), v=cat("v"))

    def select(self, index: torch.Tensor | list[int]) -> LayerQueries:
        """The preconditioned gradients of some queries only."""
        idx = torch.as_tensor(index, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return LayerQueries(dense=pick(self.dense), u=pick(self.u), s=pick(self.s), v=pick(self.v))

    @property
    def is_low_rank(self) -> bool:
        return self.u is not None

    @property
    def num_queries(self) -> int:
        return (self.dense if self.dense is not None else self.u).shape[0]  # type: ignore[union-attr]

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, σ, V) of rank-R queries."""
        if self.u is None or self.s is None or self.v is None:
            raise ValueError("these preconditioned queries are dense, not rank-R factors")
        return self.u, self.s, self.v

    @property
    def nbytes(self) -> int:
        """Bytes held: the dense form and/or the factors."""
        return sum(t.numel() * t.element_size() for t in (self.dense, self.u, self.s, self.v) if t is not None)

    @property
    def expanded_bytes(self) -> int:
        """Bytes of the dense [Q, O, I] these queries expand to."""
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return self.num_queries * self.u.shape[1] * self.v.shape[1] * self.u.element_size()  # type: ignore[union-attr]

    def expanded(self, keep: bool = True) -> torch.Tensor:
        """The dense [Q, O, I] (reconstructed from the factors if needed; kept for reuse when ``keep``)."""
        if self.dense is not None:
            return self.dense
        u, s, v = self.factors
        dense = (u * s.unsqueeze(1)) @ v.transpose(1, 2)  # [Q, O, R] @ [Q, R, I]
        if keep:
            self.dense = dense
        return dense


def choose(lq: LayerQueries, T: int, O: int, I: int, per_token: bool, forced: str, batch: int = 1, keep: bool = True) -> str:
    """'materialize', 'project' or 'project_low_rank' for one layer, a batch of ``batch`` sequences of length T.

    Costs per sequence: materialising T·O·I + Q·O·I (plus, for rank-R queries whose
    dense form is not kept, Q·O·I·R per batch to expand them), projecting
    T·(O+I)·R·Q (rank R) or T·Q·O·I (dense).
    """
    Q = lq.num_queries
    project = "project_low_rank" if lq.is_low_rank else "project"
    if per_token or forced == "project":
        return project
    if forced == "materialize":
        return "materialize"
    cost_mat = T * O * I + Q * O * I
    if lq.is_low_rank:
        rank = lq.u.shape[-1]  # type: ignore[union-attr]
        cost_proj = T * (O + I) * rank * Q
        if lq.dense is None and not keep:
            cost_mat += Q * O * I * rank // max(batch, 1)
        if lq.dense is None and Q * O * I > DENSE_QUERY_BUDGET:
            return project  # expanding the factors would cost the memory they save
    else:
        cost_proj = T * Q * O * I
    return "materialize" if cost_mat <= cost_proj else project


KEEP_GAIN = 1.25  # a rank-R layer keeps its dense form only when that makes its contraction this much cheaper


def worth_keeping(lq: LayerQueries, T: int, O: int, I: int, batch: int) -> bool:
    """Whether keeping a rank-R layer's dense [Q, O, I] across batches cuts its contraction by ``KEEP_GAIN``.

    With it kept, materialising costs T·O·I + Q·O·I per sequence; without, the
    cheaper of projecting, T·(O+I)·R·Q, and materialising after expanding the
    factors in every batch (Q·O·I·R more per batch). Where the gain is small
    (wide layers, few queries) the memory the rank saves is worth more.
    """
    if not lq.is_low_rank or lq.dense is not None:
        return False
    Q, R = lq.num_queries, lq.factors[0].shape[-1]
    kept = T * O * I + Q * O * I
    not_kept = min(T * (O + I) * R * Q, kept + Q * O * I * R // max(batch, 1))
    return not_kept > KEEP_GAIN * kept


def layer_scores(
    lq: LayerQueries, a: torch.Tensor, ds: torch.Tensor, algorithm: str, keep: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's scores for one batch: totals [Q, B] and, when projecting, per-token [Q, B, T].

    ``keep``: a rank-R layer expanded to materialise keeps its dense form for the next batches.
    """
    B, T, I = a.shape
    O = ds.shape[-1]
    if algorithm == "materialize":
        p = lq.expanded(keep).reshape(lq.num_queries, O * I).to(a.dtype)  # [Q, O·I]
        totals = [p @ sequence_gradients(a[sl], ds[sl]).reshape(-1, O * I).T for sl in batch_chunks(B, O * I)]
        return torch.cat(totals, dim=1), None  # [Q, B]
    a2, ds2 = a.reshape(B * T, I), ds.reshape(B * T, O)
    if algorithm == "project_low_rank":
        tok = _project_low_rank(lq, a2, ds2)
    else:
        tok = _project_dense(lq.expanded(), a2, ds2)
    per_token = tok.T.reshape(-1, B, T)  # [Q, B, T]
    return per_token.sum(-1), per_token


def _project_low_rank(lq: LayerQueries, a2: torch.Tensor, ds2: torch.Tensor) -> torch.Tensor:
    """Σ_k σ_k (ds_t·u_k)(v_k·ā_t) for every token and query, [B·T, Q]."""
    if lq.u is None or lq.v is None or lq.s is None:
        raise ValueError("a dense LayerQueries has no rank-R factors to project with")
    Q, O, R = lq.u.shape
    I = lq.v.shape[1]
    out = []
    for qs in batch_chunks(Q, a2.shape[0] * R, CHUNK_ELEMENTS):
        u = lq.u[qs].to(a2.dtype).permute(1, 0, 2).reshape(O, -1)  # [O, q·R]
        v = lq.v[qs].to(a2.dtype).permute(1, 0, 2).reshape(I, -1)  # [I, q·R]
        x = (ds2 @ u) * (a2 @ v)  # [B·T, q·R]
        out.append((x.view(a2.shape[0], -1, R) * lq.s[qs].to(a2.dtype)).sum(-1))  # [B·T, q]
    return torch.cat(out, dim=1)


def _project_dense(p: torch.Tensor, a2: torch.Tensor, ds2: torch.Tensor) -> torch.Tensor:
    """ds_tᵀ P_q ā_t for every token and query with a dense P [Q, O, I], [B·T, Q]."""
    Q, O, I = p.shape
    out = []
    for qs in batch_chunks(Q, a2.shape[0] * O, CHUNK_ELEMENTS):
        pa = a2 @ p[qs].to(a2.dtype).permute(2, 0, 1).reshape(I, -1)  # [B·T, q·O]: P_q ā_t
        out.append((pa.view(a2.shape[0], -1, O) * ds2.unsqueeze(1)).sum(-1))  # [B·T, q]
    return torch.cat(out, dim=1)


__all__ = ["LayerQueries", "choose", "layer_scores", "worth_keeping", "DENSE_QUERY_BUDGET", "KEEP_GAIN"]
