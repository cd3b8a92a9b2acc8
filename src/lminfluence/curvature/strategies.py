"""The diagonal, K-FAC and EK-FAC approximations (docs/method.md §3)."""

from __future__ import annotations

import torch

from ..hooks.collector import LayerCapture
from ..hooks.modules import LayerInfo
from . import math as cm
from .base import CORRECTION, COVARIANCE, Curvature, EigenbasisCurvature, Identity
from .lissa import LiSSA


class Diagonal(EigenbasisCurvature):
    """Λ = mean over sequences of DW ⊙ DW, in the parameter basis."""

    name = "diagonal"
    passes = (CORRECTION,)

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture]) -> None:
        self._accumulate_squares(captures)

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        self._finalize_squares(num_sequences)


class KFAC(EigenbasisCurvature):
    """G ≈ T̄ · A ⊗ S per layer: Λ = T̄ · e_S e_Aᵀ in the Kronecker eigenbasis.

    T̄ (mean real tokens per sequence) puts K-FAC on the per-sequence scale of
    EK-FAC: the per-sequence Fisher of T independent tokens is T · A ⊗ S.
    """

    name = "kfac"
    passes = (COVARIANCE,)

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture]) -> None:
        shared: dict[int, torch.Tensor] = {}  # layers fed the same ā (gate/up) share A
        for name, cap in captures.items():
            st = self.state[name]
            cov_a = shared.get(id(cap.a))
            if cov_a is None:
                cov_a = shared[id(cap.a)] = cm.token_covariance(cap.a)
            cov_s = cm.token_covariance(cap.ds)
            if "a_sum" in st:
                st["a_sum"].add_(cov_a)
                st["s_sum"].add_(cov_s)
            else:
                st["a_sum"], st["s_sum"] = cov_a.clone(), cov_s

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        mean_tokens = num_tokens / num_sequences
        for st in self.state.values():
            e_a, st["q_a"] = cm.eigh64(cm.symmetrize(st.pop("a_sum")) / num_tokens)
            e_s, st["q_s"] = cm.eigh64(cm.symmetrize(st.pop("s_sum")) / num_tokens)
            st["e_a"], st["e_s"] = e_a, e_s
            st["lambda"] = mean_tokens * torch.outer(e_s, e_a)  # [O, I]
        self._bases.clear()


class EKFAC(KFAC):
    """K-FAC's eigenbasis with the eigenvalues refitted per sequence (Eq 20)."""

    name = "ekfac"
    passes = (COVARIANCE, CORRECTION)

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture]) -> None:
        if pass_name == COVARIANCE:
            super().accumulate(pass_name, captures)
        else:
            self._accumulate_squares(captures)

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        if pass_name == COVARIANCE:
            super().finalize(pass_name, num_tokens, num_sequences)
        else:
            self._finalize_squares(num_sequences)


STRATEGY_CLASSES: dict[str, type[Curvature]] = {c.name: c for c in (Identity, Diagonal, KFAC, EKFAC, LiSSA)}


def make_curvature(strategy: str, layers: dict[str, LayerInfo], config=None) -> Curvature:
    if strategy not in STRATEGY_CLASSES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGY_CLASSES)}")
    return STRATEGY_CLASSES[strategy](layers, config)


__all__ = ["Diagonal", "KFAC", "EKFAC", "Identity", "LiSSA", "STRATEGY_CLASSES", "make_curvature"]
