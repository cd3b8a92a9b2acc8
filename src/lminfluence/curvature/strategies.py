"""The diagonal, K-FAC and EK-FAC approximations (docs/method.md §3)."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar

import torch

from .. import distributed as dist
from ..errors import TrackingError
from ..hooks.collector import LayerCapture
from ..hooks.modules import LayerInfo
from . import math as cm
from .base import CORRECTION, COVARIANCE, Curvature, EigenbasisCurvature, Identity
from .lissa import LiSSA


class Diagonal(EigenbasisCurvature):
    """Λ = mean over sequences of DW ⊙ DW, in the parameter basis."""

    name = "diagonal"
    passes = (CORRECTION,)

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture], draw: int = 0) -> None:
        self._accumulate_squares(captures, draw)

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        self._finalize_squares(num_sequences)


def _add(state: dict, key: str, blocks: tuple[torch.Tensor, ...]) -> None:
    """Add a batch's covariance blocks (packed upper triangles) into the layer's float64 running sums."""
    if key in state:
        for total, b in zip(state[key], blocks):
            total.add_(b)
    else:
        state[key] = tuple(b.to(torch.float64) for b in blocks)


def _spread(costs: dict, world: int | None = None) -> dict:
    """Each unit → a rank: the costliest first, each to the least loaded of ``world`` ranks (default: the group's; the same on every rank)."""
    load = [0] * (world or dist.world_size())
    order = {u: i for i, u in enumerate(costs)}
    out = {}
    for unit in sorted(costs, key=lambda u: (-costs[u], order[u])):
        r = min(range(len(load)), key=lambda k: (load[k], k))
        out[unit] = r
        load[r] += costs[unit]
    return out


class KFAC(EigenbasisCurvature):
    """G ≈ T̄ · A ⊗ S per layer: Λ = T̄ · e_S e_Aᵀ in the Kronecker eigenbasis.

    T̄ (mean real tokens per sequence) puts K-FAC on the per-sequence scale of
    EK-FAC: the per-sequence Fisher of T independent tokens is T · A ⊗ S.
    With ``FactorConfig.blocks`` = k > 1, A and S are each cut into k diagonal
    blocks of consecutive coordinates (Appendix A), decomposed separately.
    """

    name = "kfac"
    passes: ClassVar[tuple[str, ...]] = (COVARIANCE,)
    kronecker_eigenvalues = True  # Λ = T̄ e_S e_Aᵀ (EK-FAC refits Λ instead)

    def _owners(self, captures: dict[str, LayerCapture]) -> dict[str, str]:
        """Layers fed the same ā tensor (gate and up) → the first of them, which holds the shared A."""
        first: dict[int, str] = {}
        owners = {name: first.setdefault(id(cap.a), name) for name, cap in captures.items()}
        shared = {n: o for n, o in owners.items() if n != o}
        if not any("a_sum" in st or "q_a" in st for st in self.state.values()):
            self.shared_a = shared
        elif shared != self.shared_a:
            raise TrackingError(
                f"the tracked layers that read the same input changed between batches ({self.shared_a} → {shared}); "
                "the model must call its layers the same way for every batch"
            )
        return owners

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture], draw: int = 0) -> None:
        blocks = getattr(self.config, "blocks", 1)
        owners = self._owners(captures)
        for name, cap in captures.items():
            st = self.state[name]
            if owners[name] == name and draw == 0:  # A has no labels: counted once per sequence; a shared A by its owner
                _add(st, "a_sum", cm.block_covariances(cap.a, blocks))
            _add(st, "s_sum", cm.block_covariances(cap.ds, blocks))
        if self.dtype is None:
            self.dtype = self.storage_dtype(next(iter(captures.values())).a.dtype)

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        mean_tokens = num_tokens / num_sequences
        # Under torch.distributed the sums are already summed over ranks: each (layer, side) is
        # decomposed by one rank (``dist.owner`` of its position) and broadcast to the others.
        units = [(name, side) for name, st in self.state.items() for side in ("a", "s") if f"{side}_sum" in st]
        # (dimension, device) of each block, for the ranks that receive a unit they did not decompose
        sizes = {u: [((math.isqrt(8 * b.numel() + 1) - 1) // 2, b.device) for b in self.state[u[0]][f"{u[1]}_sum"]] for u in units}
        # by_layer placement: this rank holds only its own layers, and decomposes them all itself
        owners = {u: dist.rank() for u in units} if self.owners is not None else _spread({u: sum(n**3 for n, _ in sizes[u]) for u in units})
        mine = {u for u in units if owners[u] == dist.rank()}
        count = {"a": num_tokens, "s": num_tokens * self.label_draws}  # S: the mean over tokens and label draws
        # every block of every A and S sum, decomposed a few at a time (eigh_many runs them side by
        # side); each float64 sum is released once decomposed, so the peak holds the sums plus a few workspaces
        pending = deque(
            (name, side, block)
            for name, side in units
            for block in self.state[name].pop(f"{side}_sum")
            if (name, side) in mine
        )
        done: dict[tuple[str, str], list] = {}
        width = torch.get_num_threads() if pending and pending[0][2].device.type == "cpu" else 1
        with dist.checked():  # a rank whose decomposition fails stops the others before the broadcasts
            while pending:
                chunk = [pending.popleft() for _ in range(min(width, len(pending)))]
                means = [cm.unpack_symmetric(block) / count[side] for _, side, block in chunk]
                keys = [(name, side) for name, side, _ in chunk]
                del chunk
                for key, (e, q) in zip(keys, cm.eigh_many(means)):
                    done.setdefault(key, []).append((e.to(self.dtype), q.to(self.dtype)))
                del means
        if dist.active() and self.owners is None:
            done = self._share_bases(units, owners, sizes, done)
        for (name, side), parts in done.items():
            st = self.state[name]
            st[f"e_{side}"] = torch.cat([e for e, _ in parts])
            st[f"q_{side}"] = parts[0][1] if len(parts) == 1 else tuple(q for _, q in parts)
        for layer, owner in self.shared_a.items():
            self.state[layer]["e_a"], self.state[layer]["q_a"] = self.state[owner]["e_a"], self.state[owner]["q_a"]
        if self.kronecker_eigenvalues:
            for st in self.state.values():
                st["lambda"] = (mean_tokens * torch.outer(st["e_s"].double(), st["e_a"].double())).to(self.dtype)  # [O, I]
        self._place()

    def _share_bases(self, units: list, owners: dict, sizes: dict, done: dict) -> dict:
        """Every rank's eigendecompositions on every rank: each (layer, side) broadcast from the rank that computed it."""
        out = {}
        for unit in units:
            src = owners[unit]
            if src == dist.rank():
                parts = done[unit]
            else:
                parts = [(torch.empty(n, dtype=self.dtype, device=dev), torch.empty(n, n, dtype=self.dtype, device=dev)) for n, dev in sizes[unit]]
            for e, q in parts:
                dist.broadcast_([e, q], src)
            out[unit] = parts
        return out


class EKFAC(KFAC):
    """K-FAC's eigenbasis with the eigenvalues refitted per sequence (Eq 20)."""

    name = "ekfac"
    passes = (COVARIANCE, CORRECTION)
    kronecker_eigenvalues = False

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture], draw: int = 0) -> None:
        if pass_name == COVARIANCE:
            super().accumulate(pass_name, captures, draw)
        else:
            self._accumulate_squares(captures, draw)

    def finalize(self, pass_name: str, num_tokens: int, num_sequences: int) -> None:
        if pass_name == COVARIANCE:
            super().finalize(pass_name, num_tokens, num_sequences)
        else:
            self._finalize_squares(num_sequences)


STRATEGY_CLASSES: dict[str, type[Curvature]] = {c.name: c for c in (Identity, Diagonal, KFAC, EKFAC, LiSSA)}


def make_curvature(strategy: str, layers: dict[str, LayerInfo], config=None) -> Curvature:
    """An empty curvature of ``strategy`` for ``layers``."""
    if strategy not in STRATEGY_CLASSES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGY_CLASSES)}")
    return STRATEGY_CLASSES[strategy](layers, config)


__all__ = ["Diagonal", "KFAC", "EKFAC", "Identity", "LiSSA", "STRATEGY_CLASSES", "make_curvature"]
