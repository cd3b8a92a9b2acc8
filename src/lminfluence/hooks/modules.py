"""Which layers are tracked, and the one adapter that knows nn.Linear and HF Conv1D."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InputError

try:  # transformers' GPT-2 layer: weight stored [I, O]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a core dependency
    Conv1D = None  # type: ignore[assignment,misc]

MLP_NAMES = frozenset({"mlp", "feed_forward", "ffn", "mlp_block", "dense_mlp"})
ATTENTION_NAMES = frozenset({"attn", "self_attn", "attention", "self_attention", "cross_attn"})
PRESETS = {"mlp": MLP_NAMES, "attention": ATTENTION_NAMES}
_INDEX = re.compile(r"^\d+$")


def _key(module: str, leaf: str) -> str:
    """A parameter's qualified name ("weight" for the module itself)."""
    return f"{module}.{leaf}" if module else leaf


@dataclass(frozen=True)
class LayerInfo:
    """A tracked linear map s = W̄ ā, with ā = (a, 1) when the layer has a bias."""

    kind: str  # "linear" | "conv1d"
    in_features: int
    out_features: int
    bias: bool

    @property
    def in_dim(self) -> int:
        """I: the size of ā, the bias coordinate included."""
        return self.in_features + int(self.bias)

    @property
    def out_dim(self) -> int:
        """O: the size of the layer's output."""
        return self.out_features

    def to_dict(self) -> dict:
        return asdict(self)

    def to_params(self, name: str, wbar: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        """Split W̄ [..., O, I] into the module's parameters by qualified name (Conv1D stores its weight [in, O])."""
        w = wbar[..., : self.in_features]  # [..., O, in]
        out = {_key(prefix + name, "weight"): w.transpose(-1, -2) if self.kind == "conv1d" else w}
        if self.bias:
            out[_key(prefix + name, "bias")] = wbar[..., self.in_features]  # [..., O]
        return out

    def from_params(self, name: str, params: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """The inverse of ``to_params``: the module's parameters as W̄ [..., O, I]."""
        w = params[_key(prefix + name, "weight")]
        w = w.transpose(-1, -2) if self.kind == "conv1d" else w
        if self.bias:
            w = torch.cat([w, params[_key(prefix + name, "bias")].unsqueeze(-1)], dim=-1)
        return w


def is_supported(module: nn.Module) -> bool:
    """True for the layers the adapter knows: nn.Linear and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def layer_info(module: nn.Module) -> LayerInfo:
    """The shape and kind of a supported layer (TypeError for any other module)."""
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.in_features, module.out_features, module.bias is not None)
    if Conv1D is not None and isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return LayerInfo("conv1d", in_f, out_f, module.bias is not None)
    raise TypeError(f"{type(module).__name__} is not a supported layer (nn.Linear or transformers Conv1D)")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """W̄ as an [O, I] matrix, the bias as its last column (a view-free copy)."""
    return layer_info(module).from_params("", dict(module.named_parameters())).detach().clone()


def _in_block(name: str, block_names: frozenset[str]) -> bool:
    """True when the name runs through a numbered block, then one of ``block_names``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part) and any(p in block_names for p in parts[i + 1 : -1]):
            return True
    return False


def resolve_modules(model: nn.Module, patterns: Sequence[str] | None) -> dict[str, nn.Module]:
    """The tracked modules by qualified name, in the model's order.

    Args:
        model: the model.
        patterns: presets (``"mlp"``, ``"attention"``) or globs over module
            names; None means ``("mlp",)``.

    Raises:
        ValueError: a pattern matched no linear layer, naming some that exist.
    """
    patterns = ("mlp",) if patterns is None else tuple(patterns)
    candidates = {n: m for n, m in model.named_modules() if n and is_supported(m)}
    if not candidates:
        raise InputError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to track")
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in PRESETS:
            hits = {n for n in candidates if _in_block(n, PRESETS[pattern])}
        else:
            hits = {n for n in candidates if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            examples = ", ".join(list(candidates)[:6])
            hint = (
                "the model's blocks have no module named like an MLP; pass modules=[...] with globs"
                if pattern in PRESETS
                else "check the spelling"
            )
            raise InputError(
                f"module pattern {pattern!r} matched no linear layer ({hint}); "
                f"linear layers include: {examples}{', …' if len(candidates) > 6 else ''}"
            )
        chosen |= hits
    return {n: m for n, m in candidates.items() if n in chosen}


__all__ = ["LayerInfo", "is_supported", "layer_info", "weight_matrix", "resolve_modules", "PRESETS"]
