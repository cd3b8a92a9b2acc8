"""Layer-owned factors (``Execution(factor_placement="by_layer")``): each tracked layer's factors on one rank.

With the default ``replicated`` placement every rank of a distributed fit holds
every layer's running sums, eigenbases and Λ. With ``by_layer`` each tracked
layer has one owner rank, chosen at the first batch so that the ranks hold
about the same bytes of factors (A's I², S's O² and Λ's O·I; layers that share
ā, the gate and up projections, go to the same rank). A rank then holds the
sums, eigendecompositions, Λ and (when scoring) preconditioned queries of its
own layers only.

Every rank runs as many batches as the others (as an FSDP-sharded model must),
so after each batch's backward pass the ranks can exchange captures in step:
each layer's ā [B_r, T_r, I] and ds [B_r, T_r, O] of every rank are gathered to
its owner (padded to the longest, T zero-padded: padding contributes nothing),
which then accumulates or scores the sequences of all ranks for that layer.
This is one collective per layer and batch, of B·T·(I + O) numbers, where a
gradient would be O·I per sequence.

Scores come out per layer on the layers' owners, their columns in the order
of the gathered batches; ``Columns`` puts them back in the order of the
training set and sums them over ranks (each layer's scores are non-zero on one
rank only), so every rank returns the tables of one process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..errors import InputError
from ..hooks.collector import LayerCapture
from .base import Curvature
from .strategies import _spread


def by_layer(curvature: Curvature) -> bool:
    """True when ``curvature``'s layers are spread over the ranks of the current process group."""
    return curvature.owners is not None and dist.active()


def assign_owners(captures: dict[str, LayerCapture], world: int | None = None) -> dict[str, int]:
    """Each layer → its owner rank: groups of layers sharing ā kept together, the largest first to the least loaded rank.

    The same on every rank: it depends on the captures' shapes and on which layers share ā only.
    ``world``: the number of ranks (default: the process group's).
    """
    groups: dict[int, list[str]] = {}
    for name, cap in captures.items():
        groups.setdefault(id(cap.a), []).append(name)
    costs = {}
    for members in groups.values():
        i = captures[members[0]].a.shape[-1]
        costs[tuple(members)] = i * i + sum(o * o + o * i for o in (captures[m].ds.shape[-1] for m in members))
    return {m: r for members, r in _spread(costs, world).items() for m in members}


class Gather:
    """Sends each batch's captures of every rank to the layers' owners.

    ``sizes`` is every rank's (B_r, T_r) of the last batch gathered: the gathered
    captures hold rank 0's B_0 sequences first, then rank 1's, and so on.
    """

    def __init__(self, owners: dict[str, int]) -> None:
        self.owners = owners
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, draws: Sequence[dict[str, LayerCapture]]) -> list[dict[str, LayerCapture]]:
        """Each label draw's captures of this rank's layers, over the sequences of every rank."""
        first = next(iter(draws[0].values())).a
        self.sizes = [tuple(s) for s in dist.all_gather_objects(tuple(first.shape[:2]))]
        me = dist.rank()
        gathered_a: dict[int, torch.Tensor | None] = {}  # ā shared by several layers (and every draw) travels once
        out = []
        for captures in draws:
            mine = {}
            for name, cap in captures.items():
                dst = self.owners[name]
                if id(cap.a) not in gathered_a:
                    gathered_a[id(cap.a)] = dist.gather_to(cap.a, dst, [(b, t, cap.a.shape[-1]) for b, t in self.sizes])
                ds = dist.gather_to(cap.ds, dst, [(b, t, cap.ds.shape[-1]) for b, t in self.sizes])
                if dst == me:
                    a = gathered_a[id(cap.a)]
                    if a is None or ds is None:
                        raise RuntimeError(f"layer {name!r}: its owner received no captures (a bug in lminfluence)")
                    mine[name] = LayerCapture(a=a, ds=ds)
            out.append(mine)
        return out


class Columns:
    """Per-batch results over the gathered sequences of every rank ([..., ΣB_r, …] along ``dim``), put back in order.

    ``add`` takes one batch's result (None on a rank that holds no layer: zeros),
    ``result`` returns [..., N, …] in the training set's order, summed over ranks.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.parts: list[tuple[torch.Tensor | None, list[tuple[int, int]]]] = []

    def add(self, t: torch.Tensor | None, sizes: list[tuple[int, int]]) -> None:
        self.parts.append((None if t is None else t.cpu(), sizes))

    def result(self, shape: tuple[int, ...], dtype: torch.dtype, tokens: bool = False) -> torch.Tensor:
        """The reordered, rank-summed result; ``shape`` is its size outside ``dim`` (and, with ``tokens``, before the last axis)."""
        length = max(t for _, sizes in self.parts for _, t in sizes) if tokens else 0
        per_rank: list[list[torch.Tensor]] = [[] for _ in range(dist.world_size())]
        for t, sizes in self.parts:
            n = sum(b for b, _ in sizes)
            if t is None:
                full = list(shape[: self.dim]) + [n] + list(shape[self.dim :]) + ([max(s for _, s in sizes)] if tokens else [])
                t = torch.zeros(full, dtype=dtype)
            if tokens:
                t = F.pad(t, (0, length - t.shape[-1]))
            for r, piece in enumerate(t.split([b for b, _ in sizes], dim=self.dim)):
                per_rank[r].append(piece)
        out = torch.cat([torch.cat(p, dim=self.dim) for p in per_rank], dim=self.dim)
        dist.all_reduce_sum_([out])
        return out


class OwnedScores:
    """Scores from layer-owned factors: each batch's results over every rank's sequences, put in order and summed over ranks.

    ``dim`` is the sequences' axis: 1 for pairwise scores [Q, B] (``queries``: this rank's
    preconditioned queries, to learn Q even on a rank that holds no layer), 0 for self-influence [B].
    """

    def __init__(self, layers: Iterable[str], per_layer: bool, per_token: bool, queries: Mapping[str, Any] | None, dim: int) -> None:
        self.total = Columns(dim)
        self.layers = {n: Columns(dim) for n in layers} if per_layer else None
        self.tokens = Columns(dim) if per_token else None
        local = next((lq.num_queries for lq in queries.values()), 0) if queries is not None else 0
        self.shape: tuple[int, ...] = (max(dist.all_gather_objects(local)),) if queries is not None else ()
        self.dtype = torch.float64

    def add(self, total: torch.Tensor | None, layers: dict[str, torch.Tensor], tokens: torch.Tensor | None, sizes: list, dtype: torch.dtype) -> None:
        """One batch: this rank's layers' sum, each of its layers' scores, their per-token sum (None where it holds none)."""
        self.dtype = dtype
        self.total.add(total, sizes)
        for name, c in (self.layers or {}).items():
            c.add(layers.get(name), sizes)
        if self.tokens is not None:
            self.tokens.add(tokens, sizes)

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """(total, per layer, per token) over the whole training set, as one process computes them (a collective)."""
        return (
            self.total.result(self.shape, self.dtype),
            {n: c.result(self.shape, self.dtype) for n, c in self.layers.items()} if self.layers is not None else None,
            self.tokens.result(self.shape, self.dtype, tokens=True) if self.tokens is not None else None,
        )


def share_means(curvature: Curvature) -> None:
    """Every layer's mean eigenvalue (the unit of relative damping) on every rank: each owner's, exchanged once."""
    if not by_layer(curvature):
        return
    mine = {n: curvature.mean_eigenvalue(n) for n in curvature.state}
    curvature.remote_means = {n: m for part in dist.all_gather_objects(mine) for n, m in part.items()}


def gathered_curvature(curvature: Curvature) -> Curvature | None:
    """On rank 0: a curvature holding every layer's tensors, received layer by layer from the owners; None elsewhere.

    What it holds is what a replicated fit would hold (each tensor as its owner computed it), so
    saving it writes the usual factors files.
    """
    local = curvature.state_dict()
    metas = dist.all_gather_objects([(k, tuple(v.shape), v.dtype) for k, v in local.items()])
    shared = {n: o for part in dist.all_gather_objects(curvature.shared_a) for n, o in part.items()}
    flat: dict[str, torch.Tensor] = {}
    for src, meta in enumerate(metas):
        received = dist.send_to([local[k] for k, _, _ in meta] if dist.rank() == src else [], src, 0, [(s, d) for _, s, d in meta])
        flat.update({k: t.cpu() for (k, _, _), t in zip(meta, received)})
    if not dist.is_main():
        return None
    full = type(curvature)(curvature.layers, curvature.config)
    full.load_state_dict(flat, shared)
    full.dtype = curvature.dtype
    return full


def refuse(what: str) -> InputError:
    """The error for a feature that does not work with layer-owned factors."""
    return InputError(f"{what} does not support factors placed by layer (Execution(factor_placement='by_layer')); use the replicated placement")


__all__ = ["by_layer", "assign_owners", "Gather", "Columns", "OwnedScores", "share_means", "gathered_curvature", "refuse"]
