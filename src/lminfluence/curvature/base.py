"""One interface for every curvature approximation: accumulate → finalize → precondition.

Per-layer state is a mapping of tensors. An eigenbasis (``q_a``, ``q_s``) is one
tensor, or a tuple of diagonal blocks with ``FactorConfig.blocks`` > 1. Layers
that read the same input tensor (the gate and up projections of a gated MLP)
share one A factor: its eigendecomposition is computed and stored once, under
the first such layer, and ``shared_a`` maps each other layer to that one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

from ..hooks.collector import LayerCapture
from ..hooks.modules import LayerInfo
from . import math as cm

COVARIANCE = "covariance"  # token statistics A = E[ā āᵀ], S = E[ds dsᵀ]
CORRECTION = "correction"  # per-sequence statistics Λ = E[(Q_Sᵀ DW Q_A)²]
A_KEYS = ("q_a", "e_a", "a_sum")  # the A side of a layer: held once per group of layers sharing ā


class LazyLayer(Mapping):
    """One layer's tensors read from a tensor source on every access (nothing kept in memory).

    ``entries`` maps a state key to one flat tensor name, or to a list of names
    (the blocks of a block-diagonal basis).
    """

    def __init__(self, source: Mapping[str, torch.Tensor], entries: dict[str, str | list[str]]) -> None:
        self.source, self.entries = source, entries

    def __getitem__(self, key: str) -> Any:
        names = self.entries[key]
        if isinstance(names, list):
            return tuple(self.source[n] for n in names)
        return self.source[names]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _split_key(full: str) -> tuple[str, str, int | None]:
    """'layer::key' → (layer, key, None); 'layer::key.3' → (layer, key, 3)."""
    layer, _, key = full.rpartition("::")
    base, dot, index = key.rpartition(".")
    if dot and index.isdigit():
        return layer, base, int(index)
    return layer, key, None


class Curvature:
    """Base class. A strategy lists the passes over the data it needs in ``passes``.

    For each pass the fitting loop calls ``accumulate`` once per batch and
    label draw with every layer's captures (``draw`` = 0, …, K-1, with K =
    ``label_draws``: ā is the same in every draw, ds differs), then ``finalize``
    with the pass's token and sequence counts (each sequence counted once). ``precondition`` applies (G + λI)⁻¹ per layer, in the
    per-sequence scale of the summed loss (docs/method.md §1).

    Attributes:
        offload: keep the fitted tensors on the CPU and move them to the
            compute device one layer at a time, when used (``Execution.offload_factors``).
    """

    name: ClassVar[str]
    passes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layers: dict[str, LayerInfo], config: Any = None) -> None:
        self.layers = dict(layers)
        self.config = config  # the FactorConfig, for strategies with settings of their own
        self.state: dict[str, Any] = {n: {} for n in layers}
        self.shared_a: dict[str, str] = {}  # layer → the layer whose A factor it uses
        self.offload = False
        self.lazy = False  # state read from the file on each access (load_factors(..., lazy=True))
        self.dtype: torch.dtype | None = None  # storage dtype of fitted tensors, set by the first batch
        # Q_A, Q_S cast to the compute dtype and device, derived from state (never saved)
        self._bases: dict[tuple, Any] = {}
        self._means: dict[str, float] = {}
        self._rotated: dict[str, torch.Tensor] = {}  # ā Q_A of the batch whose label draws are being accumulated
        # factor_placement="by_layer": layer → the rank holding its factors; ``state`` then holds this rank's
        # layers only, and ``remote_means`` the mean eigenvalue (damping unit) of the others (``placement``)
        self.owners: dict[str, int] | None = None
        self.remote_means: dict[str, float] = {}

    def own(self, owners: dict[str, int], rank: int) -> None:
        """Hold only the layers that ``owners`` gives ``rank`` (their state so far is kept, the others' dropped)."""
        self.owners = dict(owners)
        self.state = {n: st for n, st in self.state.items() if owners[n] == rank}
        self.shared_a = {n: o for n, o in self.shared_a.items() if n in self.state}
        self._bases.clear()
        self._means.clear()

    @property
    def label_draws(self) -> int:
        """K, the label draws per sequence that ``accumulate`` receives (``FactorConfig.label_draws``)."""
        return int(getattr(self.config, "label_draws", 1))

    def accumulate(self, pass_name: str, captures: dict[str, LayerCapture], draw: int = 0) -> None:
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

        Returns the dense [B, O, I], or with ``rank`` rank-R factors
        U [B, O, R], σ [B, R], V [B, I, R] (``math.factorize``).
        """
        p = self.precondition(name, cm.sequence_gradients(a, ds), damping)
        return p if rank is None else cm.factorize(p, rank)

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

    def running_sums(self) -> list[torch.Tensor]:
        """The float64 running sums of the pass in progress (keys ending in ``_sum``), blocks flattened, in a fixed order.

        Under ``torch.distributed`` the fitting loop sums them over ranks before ``finalize``:
        every rank must have accumulated at least one batch, so that all hold the same tensors.
        """
        out: list[torch.Tensor] = []
        for st in self.state.values():
            for key in sorted(k for k in st if k.endswith("_sum")):
                value = st[key]
                out.extend(value if isinstance(value, tuple) else (value,))
        return out

    # ------------------------------------------------------------ state on disk

    def a_owner(self, name: str) -> str:
        """The layer whose A factor ``name`` uses (itself unless shared)."""
        return self.shared_a.get(name, name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor once, as 'layer::key' (blocks as 'layer::key.k'); a shared A only under its owner."""
        out: dict[str, torch.Tensor] = {}
        for layer, st in self.state.items():
            for key, value in st.items():
                if key in A_KEYS and self.a_owner(layer) != layer:
                    continue
                if isinstance(value, tuple):
                    out.update({f"{layer}::{key}.{k}": b.contiguous() for k, b in enumerate(value)})
                else:
                    out[f"{layer}::{key}"] = value.contiguous()
        return out

    def load_state_dict(self, flat: Mapping[str, torch.Tensor], shared_a: Mapping[str, str] | None = None, *, lazy: bool = False) -> None:
        """The inverse of ``state_dict``. With ``lazy`` the tensors stay in ``flat`` (read on each access)."""
        entries: dict[str, dict[str, Any]] = {n: {} for n in self.layers}
        for full in flat.keys():
            layer, key, index = _split_key(full)
            if layer not in entries:
                raise ValueError(f"factor tensor {full!r} belongs to no tracked layer")
            if index is None:
                entries[layer][key] = full
            else:
                entries[layer].setdefault(key, []).append((index, full))
        for e in entries.values():
            for key, names in e.items():
                if isinstance(names, list):
                    e[key] = [n for _, n in sorted(names)]
        self.shared_a = dict(shared_a or {})
        for layer, owner in self.shared_a.items():
            if owner not in entries or layer not in entries:
                raise ValueError(f"layer {layer!r} shares the A factor of {owner!r}, which is not tracked")
            entries[layer].update({k: v for k, v in entries[owner].items() if k in A_KEYS})
        if lazy:
            self.state = {n: LazyLayer(flat, e) for n, e in entries.items()}
        else:
            self.state = {n: dict(LazyLayer(flat, e).items()) for n, e in entries.items()}
            for layer, owner in self.shared_a.items():  # one tensor object, not two copies
                self.state[layer].update({k: v for k, v in self.state[owner].items() if k in A_KEYS})
        self.lazy = lazy
        self._bases.clear()
        self._means.clear()

    def bases(self, name: str, like: torch.Tensor) -> tuple[cm.Basis | None, cm.Basis | None]:
        """(Q_A, Q_S) of a layer in ``like``'s dtype and device; None for the parameter basis.

        Converted copies are kept for reuse unless the factors are offloaded or read from disk.
        """
        st = self.state[name]
        if self.offload or self.lazy:
            return tuple(cm.basis_to(st.get(k), device=like.device, dtype=like.dtype) for k in ("q_a", "q_s"))  # type: ignore[return-value]
        out = []
        for key, owner in (("q_a", self.a_owner(name)), ("q_s", name)):
            cache = (key, owner, like.dtype, like.device)
            if cache not in self._bases:
                self._bases[cache] = cm.basis_to(st.get(key), device=like.device, dtype=like.dtype)
            out.append(self._bases[cache])
        return out[0], out[1]

    def _place(self) -> None:
        """After a finalize: the fitted tensors go to the CPU when offloaded."""
        self._bases.clear()
        self._means.clear()
        if not self.offload:
            return
        for st in self.state.values():
            for key, value in st.items():
                st[key] = cm.basis_to(value, device="cpu") if isinstance(value, (tuple, torch.Tensor)) else value


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

    def storage_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype fitted factors are stored in.

        ``FactorConfig.factor_dtype``, or for ``auto`` the captures' compute dtype
        (float32 unless the model computes in float64).
        """
        choice = getattr(self.config, "factor_dtype", "auto")
        return compute if choice == "auto" else getattr(torch, choice)

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
        m = cm.rotated_gradients(a, ds, q_a, q_s).div_(self._denominator(name, damping, a))  # [B, O, I], eigenbasis
        if rank is None:
            return m if q_a is None else cm.right_t(cm.left(q_s, m), q_a)
        # Orthogonal Q_S, Q_A leave singular values unchanged: factorise M in the eigenbasis,
        # then rotate the thin factors (U = Q_S U_M, V = Q_A V_M), never the dense P.
        u, s, w = cm.factorize(m, rank)
        del m
        return (u, s, w) if q_a is None else (cm.left(q_s, u), s, cm.left(q_a, w))

    def self_influence(self, name: str, a: torch.Tensor, ds: torch.Tensor, damping: float) -> torch.Tensor:
        # In the eigenbasis the quadratic form is Σ R² / (Λ + λ): no rotation back
        denom = self._denominator(name, damping, a)
        bases = self.bases(name, a)
        out = []
        for sl in cm.batch_chunks(a.shape[0], a.shape[-1] * ds.shape[-1]):
            r = cm.rotated_gradients(a[sl], ds[sl], *bases)  # [b, O, I]
            out.append((r.square_() / denom).sum((1, 2)))
        return torch.cat(out)

    def mean_eigenvalue(self, name: str) -> float:
        if name not in self.state and name in self.remote_means:  # by_layer: another rank holds the layer
            return self.remote_means[name]
        if name not in self._means:
            self._means[name] = float(self.state[name]["lambda"].mean(dtype=torch.float64))
        return self._means[name]

    def _accumulate_squares(self, captures: dict[str, LayerCapture], draw: int = 0) -> None:
        # ā Q_A of the layers that share ā (gate and up), computed once and dropped after its last user;
        # with label draws, every layer's ā Q_A is kept until the batch's last draw (ā is the same in each)
        last_draw = draw == self.label_draws - 1
        users: dict[str, int] = {}
        for name in captures:
            if self.label_draws > 1 or name in self.shared_a or name in self.shared_a.values():
                users[self.a_owner(name)] = users.get(self.a_owner(name), 0) + 1
        if draw == 0:
            self._rotated = {}
        rotated = self._rotated
        for name, cap in captures.items():
            st = self.state[name]
            q_a, q_s = self.bases(name, cap.a)
            a_rotated = None
            owner = self.a_owner(name)
            if owner in users and cm.rotates_tokens(cap.a.shape[1], cap.a.shape[2], cap.ds.shape[2], q_a, q_s):
                a_rotated = rotated.get(owner)
                if a_rotated is None:
                    a_rotated = rotated[owner] = cm.right(cap.a, q_a)
                users[owner] -= 1
                if users[owner] == 0 and last_draw:
                    del rotated[owner]
            sq = cm.eigenbasis_squares(cap.a, cap.ds, q_a, q_s, a_rotated)
            if "lambda_sum" in st:
                st["lambda_sum"].add_(sq)
            else:
                st["lambda_sum"] = sq
            if self.dtype is None:
                self.dtype = self.storage_dtype(cap.a.dtype)

    def _finalize_squares(self, num_sequences: int) -> None:
        # the mean over sequences and label draws
        for st in self.state.values():
            st["lambda"] = (st.pop("lambda_sum") / (num_sequences * self.label_draws)).to(self.dtype)
        self._place()


__all__ = ["Curvature", "Identity", "EigenbasisCurvature", "LazyLayer", "COVARIANCE", "CORRECTION", "A_KEYS"]
