"""The protocol a task implements: what is trained, what is measured, how labels are sampled."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class Task(ABC):
    """What the model is trained on and what a query measures.

    Every loss returns one value per example, shape [B]; the engine sums them.
    Influence is computed for the training objective mean_z L(z, θ) with L the
    per-example loss below, and for the measurement f of each query
    (docs/method.md §1).
    """

    @abstractmethod
    def collate(self, examples: Sequence[Mapping[str, Any]]) -> Batch:
        """Stack example dicts into one batch of tensors (on the CPU)."""

    @abstractmethod
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Run the model; returns its outputs (e.g. logits [B, T, V])."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Training loss L(z) per example with the true labels, [B]."""

    @abstractmethod
    def sampled_loss(self, outputs: torch.Tensor, batch: Batch, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """L(z) per example with labels drawn from the model's predictive distribution, [B].

        Its gradient is a pseudo-gradient whose outer product equals the
        Gauss–Newton Hessian in expectation over the drawn labels.
        ``generators`` holds one generator per example of the batch: draw example
        b's labels from ``generators[b]`` only, so that they do not depend on the
        batching (``causal_lm.sample_categorical`` accepts the list as it is).
        """

    @abstractmethod
    def measurement(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The query measurement f per example, [B]; influence is on f."""

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        """[B, T] True at real (non-padding) positions; None when every position is real."""
        return None


__all__ = ["Task", "Batch"]
