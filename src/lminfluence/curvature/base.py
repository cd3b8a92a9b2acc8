"""One interface for every curvature approximation: accumulate → finalize → precondition."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..hooks.collector import LayerCapture
from ..hooks.modules import LayerInfo
from . import math as cm

COVARIANCE = "covariance"  # token statistics A = E[ā āᵀ], S = E[ds dsᵀ]
CORRECTION = "correction"  # per-sequence statistics Λ = E[(Q_Sᵀ DW Q_A)²]


class Curvature:
    """Base class. A strategy lists the passes over the data it needs in ``passes``.

    For each pass the fitting loop calls ``accumulate`` once per batch with
    every layer's captures, then ``finalize`` with the pass's token and
    sequence counts. ``precondition`` applies (G + λI)⁻¹ per layer, in the
    per-sequence scale of the summed loss (docs/method.md §1).
    """

    name: ClassVar[str]
    passes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layers: dict[str, LayerInfo], config: Any = None) -> None:
        self.layers = dict(layers)
        self.config = config  # the FactorConfig, for strategies with settings of their own
        self.state: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
        # Q_A, Q_S cast to the compute dtype and device, derived from state (never saved)
        self._bases: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture]) -> None:
        raise NotImplementedError(f"{self.name} has no pass {pass_name!r}")

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        raise NotImplementedError(f"{self.name} has no pass {pass_name!r}")

    def precondition(self, name: str, v: torch.Tensor, damping: float) -> torch.Tensor:
        """(G + λI)⁻¹ V for one layer, V [..., O, I]."""
        raise NotImplementedError

    def precondition_captures(
        self, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float, rank: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G + λI)⁻¹ DW_b for the sequences of a capture (ā [B, T, I], ds [B, T, O]).

        Returns the dense [B, O, I], or with ``rank`` its best rank-R factors
        U [B, O, R], σ [B, R], V [B, I, R].
        """
        p = self.precondition(name, cm.sequence_gradients(a, ds), damping)
        return p if rank is None else cm.low_rank(p, rank)

    def self_influence(self, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float) -> torch.Tensor:
        """DW_bᵀ (G + λI)⁻¹ DW_b for each sequence of a capture, [B]."""
        out = []
        for sl in cm.batch_chunks(a.shape[0], a.shape[-1] * ds.shape[-1]):
            dw = cm.sequence_gradients(a[sl], ds[sl])  # [b, O, I]
            out.append((self.precondition(name, dw, damping) * dw).sum((1, 2)))
        return torch.cat(out)

    def mean_eigenvalue(self, name: str) -> float:
        """The mean eigenvalue of the layer's curvature, the unit of relative damping."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{layer}::{key}": t.contiguous() for layer, d in self.state.items() for key, t in d.items()}

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        state: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.layers}
        for full, t in flat.items():
            layer, _, key = full.rpartition("::")
            if layer not in state:
                raise ValueError(f"factor tensor {full!r} belongs to no tracked layer")
            state[layer][key] = t
        self.state = state
        self._bases.clear()

    def bases(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(Q_A, Q_S) of a layer in ``like``'s dtype and device; None for the parameter basis."""
        key = (name, like.dtype, like.device)
        if key not in self._bases:
            st = self.state[name]
            self._bases[key] = tuple(  # type: ignore[assignment]
                None if st.get(k) is None else st[k].to(device=like.device, dtype=like.dtype) for k in ("q_a", "q_s")
            )
        return self._bases[key]


class Identity(Curvature):
    """No preconditioning: the gradient dot product baseline."""

    name = "identity"

    def precondition(self, name: str, v: torch.Tensor, damping: float) -> torch.Tensor:
        return v

    def mean_eigenvalue(self, name: str) -> float:
        return 1.0


class EigenbasisCurvature(Curvature):
    """Curvature diagonal in a Kronecker eigenbasis Q_A ⊗ Q_S with eigenvalues Λ [O, I].

    The diagonal Fisher is the special case Q = identity (no Q stored).
    """

    def _denominator(self, name: str, damping: float, like: torch.Tensor) -> torch.Tensor:
        """Λ + λ of a layer, [O, I], in ``like``'s dtype and device."""
        return (self.state[name]["lambda"].to(like.device) + damping).to(like.dtype)

    def precondition(self, name: str, v: torch.Tensor, damping: float) -> torch.Tensor:
        q_a, q_s = self.bases(name, v)
        return cm.precondition(v, self.state[name]["lambda"].to(v.device), damping, q_a, q_s)

    def precondition_captures(
        self, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float, rank: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_a, q_s = self.bases(name, a)
        m = cm.rotated_gradients(a, ds, q_a, q_s) / self._denominator(name, damping, a)  # [B, O, I], eigenbasis
        if rank is None:
            return m if q_a is None else q_s @ m @ q_a.T
        # Orthogonal Q_S, Q_A leave singular values unchanged: factorise M in the eigenbasis,
        # then rotate the thin factors (U = Q_S U_M, V = Q_A V_M), never the dense P.
        u, s, w = cm.low_rank(m, rank)
        return (u, s, w) if q_a is None else (q_s @ u, s, q_a @ w)

    def self_influence(self, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float) -> torch.Tensor:
        # In the eigenbasis the quadratic form is Σ R² / (Λ + λ): no rotation back
        denom = self._denominator(name, damping, a)
        out = []
        for sl in cm.batch_chunks(a.shape[0], a.shape[-1] * ds.shape[-1]):
            r = cm.rotated_gradients(a[sl], ds[sl], *self.bases(name, a))  # [b, O, I]
            out.append((r.square_() / denom).sum((1, 2)))
        return torch.cat(out)

    def mean_eigenvalue(self, name: str) -> float:
        return float(self.state[name]["lambda"].mean())

    def _accumulate_squares(self, captures: dict[str, LayerCapture]) -> None:
        for name, cap in captures.items():
            st = self.state[name]
            sq = cm.eigenbasis_squares(cap.a, cap.ds, *self.bases(name, cap.a))
            if "lambda_sum" in st:
                st["lambda_sum"].add_(sq)
            else:
                st["lambda_sum"] = sq

    def _finalize_squares(self, num_sequences: int) -> None:
        for st in self.state.values():
            st["lambda"] = st.pop("lambda_sum") / num_sequences


__all__ = ["Curvature", "Identity", "EigenbasisCurvature", "COVARIANCE", "CORRECTION"]
