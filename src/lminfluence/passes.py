"""One pass over a dataset: batch, forward, differentiate the chosen loss, capture."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .allocator import steady_heap
from .errors import InputError
from .hooks.collector import Collector, LayerCapture
from .progress import progress
from .task.base import Task

logger = logging.getLogger(__name__)

LossKind = Literal["true", "sampled", "measurement"]


def as_reiterable(data: Iterable[Mapping[str, Any]], what: str) -> Sequence[Mapping[str, Any]] | Iterable:
    """Data that can be iterated more than once (a one-shot iterator is read into a list)."""
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(f"{what} must be a sequence or iterable of example dicts, got {type(data).__name__}")
    if iter(data) is data:  # a generator or iterator: would be empty on the second pass
        data = list(data)
        logger.info("read %d %s examples from a one-shot iterator into memory", len(data), what)
    return data


def num_examples(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def batches(data: Iterable[Mapping[str, Any]], batch_size: int) -> Iterator[list[Mapping[str, Any]]]:
    """Consecutive lists of ``batch_size`` examples (the last one shorter)."""
    chunk: list[Mapping[str, Any]] = []
    for ex in data:
        chunk.append(ex)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def collate_to(task: Task, examples: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """``task.collate(examples)`` with every tensor moved to ``device``."""
    return {k: v.to(device) for k, v in task.collate(examples).items()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def half_autocast(model: nn.Module) -> torch.dtype | None:
    """The autocast dtype for a half-precision (bf16/fp16) model on a GPU; None otherwise (run it as it is).

    Under autocast the forward's matrix products run in half precision while
    autocast keeps softmax, norms and losses in float32; the captures are cast
    to float32 (``hooks.collector``), so factors and scores are float32.
    """
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
        return None
    return p.dtype


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the duration (influence is of the deterministic model); restores the mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def tracking(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[Collector]:
    """Hooks on ``modules``, dropout off and gradients on, all undone on exit (errors included)."""
    with eval_mode(model), torch.enable_grad(), Collector(modules) as collector:
        yield collector


def sequence_seed(seed: int, index: int, draw: int = 0) -> int:
    """The seed of the labels drawn for the training sequence at ``index``: a hash of (seed, index[, draw]).

    Each sequence gets its own generator, so the drawn labels, and the factors,
    do not depend on the batch size, on where a resumed fit restarts, or on
    how the data are split between processes. Draw 0 is the one-draw fit's;
    each further draw (``FactorConfig.label_draws``) hashes its number in too,
    a stream of its own.
    """
    text = f"{seed}/{index}" if draw == 0 else f"{seed}/{index}/draw{draw}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sequence_generators(seed: int, start: int, count: int, device: torch.device, draw: int = 0) -> list[torch.Generator]:
    """One generator per sequence start, …, start + count - 1, seeded by ``sequence_seed`` (of label draw ``draw``)."""
    return [torch.Generator(device=device).manual_seed(sequence_seed(seed, i, draw)) for i in range(start, start + count)]


@dataclass
class BatchCapture:
    """What one batch of a pass produced; ``end`` is the index after its last sequence.

    ``captures`` are those of label draw 0; ``extra_draws`` those of draws
    1, …, K-1 (sampled labels with ``label_draws`` = K > 1), whose ā are the
    same tensors as draw 0's (one forward pass), only ds differs.
    """

    captures: dict[str, LayerCapture]
    num_sequences: int
    num_tokens: int
    end: int = 0
    extra_draws: list[dict[str, LayerCapture]] = field(default_factory=list)

    @property
    def draws(self) -> list[dict[str, LayerCapture]]:
        """The captures of every label draw, draw 0 first."""
        return [self.captures, *self.extra_draws]


def run_pass(
    model: nn.Module,
    task: Task,
    collector: Collector,
    data: Iterable[Mapping[str, Any]],
    batch_size: int,
    loss_kind: LossKind,
    *,
    seed: int | None = None,
    start: int = 0,
    autocast: torch.dtype | None = None,
    desc: str = "",
    label_draws: int = 1,
) -> Iterator[BatchCapture]:
    """Yield each batch's captures for the gradient of the summed loss of ``loss_kind``.

    ``true``: the training loss L with the data's labels; ``sampled``: L with
    labels drawn from the model, those of the sequence at index i from a
    generator seeded by ``sequence_seed(seed, i)``; ``measurement``: g = -f, the
    query's loss. ``start`` skips the first examples (a resumed pass).
    ``label_draws`` = K > 1 (``sampled`` only): after the one forward pass, K
    backward passes through the retained graph, draw k's labels from
    ``sequence_seed(seed, i, k)``; draws 1, …, K-1 come in ``extra_draws``.
    ``autocast``: run the forward under ``torch.autocast`` with this dtype (GPU
    half precision); captures and losses stay float32.
    Run it inside ``tracking`` (eval mode, gradients on, hooks registered).
    """
    device = model_device(model)
    if device.type == "cpu":
        steady_heap()  # freed tensors go back to the system: the heap must not grow batch after batch
    total = num_examples(data)
    if loss_kind == "sampled" and seed is None:
        raise ValueError("sampled labels need a seed")
    if label_draws != 1 and loss_kind != "sampled":
        raise ValueError(f"label_draws={label_draws} needs sampled labels, not {loss_kind!r}")
    seen = start
    seen_tokens = 0
    began = time.perf_counter()
    rows = itertools.islice(data, start, None) if start else data
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with progress(total, desc, "seq") as bar:
        bar.update(start)
        for examples in batches(rows, batch_size):
            batch = collate_to(task, examples, device)
            mask = task.token_mask(batch)
            collector.begin(mask)
            with cast:
                outputs = task.forward(model, batch)
            if loss_kind == "sampled":  # K backward passes through one forward's graph, kept until the last
                draws = []
                for draw in range(label_draws):
                    gens = sequence_generators(seed, seen, len(examples), outputs.device, draw)  # type: ignore[arg-type]
                    loss = _finite(task.sampled_loss(outputs, batch, gens), desc, seen)
                    draws.append(collector.backward(loss.sum(), retain_graph=draw < label_draws - 1))
                captures, extra = draws[0], draws[1:]
            else:
                loss = task.loss(outputs, batch) if loss_kind == "true" else -task.measurement(outputs, batch)
                captures, extra = collector.backward(_finite(loss, desc, seen).sum()), []
            first = next(iter(captures.values()))
            tokens = int(mask.sum()) if mask is not None else first.a.shape[0] * first.a.shape[1]
            del outputs, loss, batch  # the logits ([B, T, V]) must not outlive the backward
            seen += len(examples)
            seen_tokens += tokens
            bar.set_postfix_str(f"{seen_tokens / max(time.perf_counter() - began, 1e-9):,.0f} tok/s", refresh=False)
            bar.update(len(examples))
            yield BatchCapture(captures, len(examples), tokens, seen, extra)
    if seen == 0:
        raise InputError(f"{desc or 'the data'}: no examples (the dataset is empty)")


def _finite(loss: torch.Tensor, desc: str, seen: int) -> torch.Tensor:
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"{desc}: non-finite loss in the batch at example {seen}")
    return loss


__all__ = [
    "as_reiterable",
    "batches",
    "collate_to",
    "run_pass",
    "tracking",
    "eval_mode",
    "model_device",
    "half_autocast",
    "sequence_seed",
    "sequence_generators",
    "BatchCapture",
    "LossKind",
]
