"""The built-in task: causal language modelling with Hugging Face conventions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .base import Batch, Task

IGNORE_INDEX = -100
SAMPLE_CHUNK = 1024  # positions whose predictive distribution is materialised at once when sampling labels


def _as_long_1d(value: Any, key: str, index: int) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 1:
        raise InputError(f"example {index}: {key!r} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError(f"example {index}: {key!r} must hold integers, got {t.dtype}")
    return t.long()


Generators = torch.Generator | Sequence[torch.Generator]


def _uniforms(rows: int, generators: Generators, device: torch.device) -> torch.Tensor:
    """[rows, 1] uniform numbers; with a list of B generators, rows are split into B equal groups, one per generator."""
    if isinstance(generators, torch.Generator):
        return torch.rand(rows, 1, generator=generators, device=device)
    if rows % len(generators):
        raise ValueError(f"{rows} rows cannot be split evenly between {len(generators)} generators")
    per = rows // len(generators)
    return torch.cat([torch.rand(per, 1, generator=g, device=device) for g in generators])


def sample_categorical(logits: torch.Tensor, generators: Generators) -> torch.Tensor:
    """One draw per row from softmax(logits) [N, V] by inverting the CDF, [N].

    One uniform number per row (torch.multinomial is several times slower on
    CPU). ``generators``: one generator, or one per example when the rows are
    B examples' equal-sized groups (each example's draws then come from its own).
    """
    cdf = torch.softmax(logits.float(), dim=-1).cumsum_(-1)  # [N, V]
    u = _uniforms(cdf.shape[0], generators, cdf.device) * cdf[:, -1:]
    # right=True: the first category whose CDF exceeds u, so zero-probability ones are never drawn
    return torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[-1] - 1).squeeze(1)


class CausalLMTask(Task):
    """Summed next-token cross-entropy; queries measure log p(completion | prompt).

    Examples are dicts with ``input_ids`` (1-D), optional ``attention_mask``
    (1 = real token) and optional ``labels`` (-100 = no loss; default: the
    input ids). Labels are aligned with the inputs and shifted inside the loss,
    as Hugging Face does: position t's logits are scored against labels[t + 1].

    Args:
        pad_token_id: id written into padded positions (they are masked, so
            any valid id works).
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> Batch:
        if len(examples) == 0:
            raise InputError("cannot collate an empty batch")
        ids, masks, labels = [], [], []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping) or "input_ids" not in ex:
                raise InputError(f"example {i} must be a dict with 'input_ids', got {type(ex).__name__}")
            x = _as_long_1d(ex["input_ids"], "input_ids", i)
            if x.numel() < 2:
                raise InputError(f"example {i} has {x.numel()} token(s); a sequence needs at least 2")
            m = _as_long_1d(ex["attention_mask"], "attention_mask", i) if ex.get("attention_mask") is not None else torch.ones_like(x)
            y = _as_long_1d(ex["labels"], "labels", i) if ex.get("labels") is not None else x.clone()
            if m.shape != x.shape or y.shape != x.shape:
                raise InputError(f"example {i}: input_ids, attention_mask and labels must have the same length")
            y = y.masked_fill(m == 0, IGNORE_INDEX)
            if not (y[1:] != IGNORE_INDEX).any():
                raise InputError(f"example {i} has no token that carries loss (all labels are -100 or padding)")
            ids.append(x)
            masks.append(m)
            labels.append(y)
        length = max(x.numel() for x in ids)

        def pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
            return torch.stack([F.pad(s, (0, length - s.numel()), value=value) for s in seqs])

        return {
            "input_ids": pad(ids, self.pad_token_id),
            "attention_mask": pad(masks, 0),
            "labels": pad(labels, IGNORE_INDEX),
        }

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        get_embeddings = getattr(model, "get_input_embeddings", None)
        emb = get_embeddings() if callable(get_embeddings) else None
        vocab = getattr(emb, "num_embeddings", None)
        if vocab is not None and int(batch["input_ids"].max()) >= vocab:
            raise InputError(
                f"token id {int(batch['input_ids'].max())} is outside the model's vocabulary of {vocab}: "
                "were the examples tokenized with another model's tokenizer?"
            )
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits if hasattr(out, "logits") else out

    @staticmethod
    def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sequence summed NLL of labels[:, t + 1] under logits[:, t], [B]."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        B, T, V = logits.shape
        # shift the labels, not the logits: slicing [B, T, V] would copy it
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]
        nll = F.cross_entropy(logits.reshape(B * T, V), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        return nll.view(B, T).sum(1)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._token_nll(outputs, batch["labels"])

    def sampled_loss(self, outputs: torch.Tensor, batch: Batch, generators: Sequence[torch.Generator]) -> torch.Tensor:
        with torch.no_grad():
            B, T, V = outputs.shape
            rows = outputs.detach()  # [B, T, V]; slicing off the last position first would copy
            # each sequence's T uniforms come from its own generator, in position order (chunking does not change them)
            drawn = torch.stack(
                [torch.cat([sample_categorical(c, g) for c in rows[b].split(SAMPLE_CHUNK)]) for b, g in enumerate(generators)]
            )[:, :-1]
            labels = batch["labels"].clone()
            keep = labels[:, 1:] != IGNORE_INDEX  # same loss-carrying positions as the true labels
            labels[:, 1:] = torch.where(keep, drawn, labels[:, 1:])
        return self._token_nll(outputs, labels)

    def measurement(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return -self._token_nll(outputs, batch["labels"])

    def token_mask(self, batch: Batch) -> torch.Tensor:
        return batch["attention_mask"].bool()


def examples_from_pairs(
    tokenizer: Any,
    pairs: Iterable[tuple[str, str]],
    *,
    add_special_tokens: bool = True,
) -> list[dict[str, list[int]]]:
    """Build query examples from (prompt, completion) texts.

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), the
    completion without; prompt tokens get label -100 so that the measurement is
    log p(completion | prompt) summed over completion tokens only.
    """
    out = []
    for i, (prompt, completion) in enumerate(pairs):
        if not completion:
            raise InputError(f"pair {i}: the completion is empty; influence needs a completion to measure")
        p = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not c:
            raise InputError(f"pair {i}: the completion {completion!r} tokenizes to nothing")
        if not p:
            raise InputError(f"pair {i}: the prompt is empty; give at least one token (e.g. BOS) to condition on")
        out.append({"input_ids": list(p) + list(c), "labels": [IGNORE_INDEX] * len(p) + list(c)})
    return out


__all__ = ["CausalLMTask", "examples_from_pairs", "IGNORE_INDEX"]
