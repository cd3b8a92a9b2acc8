"""Capture each tracked layer's inputs ā and output-gradients ds, without touching the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TrackingError
from .modules import layer_info


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models (their statistics would overflow or lose the tail), else as is."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class LayerCapture:
    """One layer's per-token quantities for one batch (padding rows are zero), in float32 or wider.

    Attributes:
        a: ā, the layer input with the bias coordinate appended, [B, T, I].
        ds: gradient of the summed loss with respect to the layer output, [B, T, O].
    """

    a: torch.Tensor
    ds: torch.Tensor


class Collector:
    """Context manager that records ā and ds for the tracked layers.

    Forward hooks store each layer's input and output; ``backward`` differentiates
    a loss with respect to the stored outputs only (``torch.autograd.grad``), so
    no parameter gradient is computed or written to ``.grad``. On exit every
    hook is removed: the model's modules, parameters and state_dict are unchanged.

    Usage::

        with Collector(modules) as col:
            col.begin(mask)
            loss = task.loss(task.forward(model, batch), batch).sum()
            captures = col.backward(loss)   # {name: LayerCapture}
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.info = {n: layer_info(m) for n, m in modules.items()}
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None
        self._a: dict[str, torch.Tensor] = {}
        self._out: dict[str, torch.Tensor] = {}
        self._version: dict[str, int] = {}
        self._shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> Collector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.begin(None)

    def begin(self, mask: torch.Tensor | None) -> None:
        """Start a new forward pass; ``mask`` [B, T] marks the real positions."""
        self._shape = None if mask is None else tuple(mask.shape)  # every layer input must be [B, T, ·]
        self._mask = None if mask is None or bool(mask.all()) else mask  # no padding: nothing to multiply
        self._a.clear()
        self._out.clear()
        self._version.clear()
        self._shared.clear()

    @staticmethod
    def _pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        # A layer input that needs no gradient (frozen weights below it) becomes a
        # leaf that does, so that the layer's output is on the autograd graph.
        x = args[0]
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and not x.requires_grad:
            return (x.detach().requires_grad_(True),) + tuple(args[1:])
        return None

    def _make_hook(self, name: str):
        info = self.info[name]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in self._out:
                raise TrackingError(
                    f"tracked module {name!r} was called twice in one forward pass; a reused or "
                    "tied layer has no single input per token: leave it out of `modules`"
                )
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), info.bias)
            hit = self._shared.get(key)  # layers fed the same tensor (gate/up) share ā
            a = None if hit is None else hit[1]
            if a is None:
                a = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, 1, -1)  # [B, T, in]
                if info.bias:
                    a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)  # [B, T, I]
                if self._shape is not None and tuple(a.shape[:2]) != self._shape:
                    raise TrackingError(
                        f"module {name!r}: input has {tuple(a.shape[:2])} (batch, positions) but the batch "
                        f"is {self._shape}; a layer fed flattened tokens (e.g. an MoE router or expert) "
                        "cannot be tracked: leave it out of `modules`"
                    )
                a = a.to(_compute_dtype(a.dtype))
                if self._mask is not None:
                    a = a * self._mask.unsqueeze(-1).to(a.dtype)
                self._shared[key] = (x, a)  # holding x keeps its address from being reused
            self._a[name] = a
            self._out[name] = output
            self._version[name] = output._version

        return hook

    def backward(self, loss: torch.Tensor) -> dict[str, LayerCapture]:
        """Differentiate ``loss`` with respect to the tracked outputs; returns the captures."""
        missing = [n for n in self.modules if n not in self._out]
        if missing:
            raise TrackingError(
                f"tracked module(s) {', '.join(missing[:4])} were not used in the forward pass; "
                "track only layers the model calls"
            )
        names = list(self.modules)
        outs = [self._out[n] for n in names]
        for n, o in zip(names, outs):
            if o._version != self._version[n]:
                raise TrackingError(
                    f"the output of tracked module {n!r} was modified in place after the layer ran "
                    "(an in-place activation?); its gradient cannot be captured"
                )
        if not loss.requires_grad:
            raise TrackingError("the loss does not depend on any tracked layer (was it computed under no_grad?)")
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
        captures = {}
        for n, o, g in zip(names, outs, grads):
            a = self._a[n]
            ds = torch.zeros_like(o) if g is None else g
            ds = ds.reshape(a.shape[0], a.shape[1], -1).to(a.dtype)  # [B, T, O]
            if self._mask is not None:
                ds = ds * self._mask.unsqueeze(-1).to(ds.dtype)
            captures[n] = LayerCapture(a=a, ds=ds)
        self._a.clear()
        self._out.clear()
        self._version.clear()
        self._shared.clear()
        return captures


__all__ = ["Collector", "LayerCapture", "TrackingError"]
