"""The language-model task of the study: a small character-level GPT-2 on Python's own prose.

Text: the prose paragraphs of ``pydoc_data`` (the reference topics that ship
with Python), lower-cased and reduced to letters, digits, space and basic
punctuation, cut into fixed-length character sequences. Characters are the
tokens (a vocabulary of about 40), so no tokenizer file is needed.

Model: ``transformers.GPT2LMHeadModel`` with 2 blocks, width 64, 4 heads, no
dropout, float64 (the PBRF is a finite difference; see tasks.py). Trained with
AdamW (SGD trains a transformer poorly; the paper does not say how its small
LM was trained) with the learning rate and weight decay picked on a
validation split, batch 32.

The tracked layers are every Conv1D of the blocks (attention and MLP: modules
``("mlp", "attention")``); embeddings, layer norms and the tied output layer
are not linear maps the library tracks, and the PBRF is restricted to the
same parameters.

Queries: held-out sequences; the first ``prompt`` characters are the prompt
(label -100), the rest the completion, f = log p(completion | prompt).
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lminfluence import CausalLMTask

from .tasks import DTYPE

MODULES = ("mlp", "attention")
_KEEP = re.compile(r"[^a-z0-9 .,;:()'\-]")


@dataclass
class LMSpec:
    seq_len: int = 48
    prompt: int = 32
    n_train: int = 256
    n_val: int = 64
    n_test: int = 10
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    steps: int = 600
    batch_size: int = 32
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    weight_decays: tuple[float, ...] = (0.0, 0.1)


def prose_text() -> str:
    """The prose paragraphs of pydoc_data's topics, normalised, joined by single spaces."""
    from pydoc_data.topics import topics

    paras = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.strip("\n").split("\n")
            if not lines or any(ln[:1].isspace() for ln in lines) or "::" in block:
                continue  # code, grammar, tables
            text = re.sub(r"\s+", " ", " ".join(lines)).strip().lower()
            text = re.sub(r"\s+", " ", _KEEP.sub(" ", text))
            if len(text) >= 80:
                paras.append(text)
    return " ".join(paras)


@dataclass
class LMData:
    vocab: list[str]
    train: list[dict[str, torch.Tensor]]
    val: list[dict[str, torch.Tensor]]
    test: list[dict[str, torch.Tensor]]  # queries: labels -100 on the prompt


def load_lm_data(spec: LMSpec, seed: int = 0) -> LMData:
    """Disjoint random windows of the prose for train, validation and test."""
    text = prose_text()
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_windows = len(ids) // spec.seq_len
    total = spec.n_train + spec.n_val + spec.n_test
    if total > n_windows:
        raise ValueError(f"the prose has {n_windows} windows of {spec.seq_len} characters, {total} are asked for")
    pick = np.random.default_rng(seed).choice(n_windows, size=total, replace=False)
    windows = [ids[i * spec.seq_len : (i + 1) * spec.seq_len] for i in pick]
    train = [{"input_ids": w} for w in windows[: spec.n_train]]
    val = [{"input_ids": w} for w in windows[spec.n_train : spec.n_train + spec.n_val]]
    test = []
    for w in windows[spec.n_train + spec.n_val :]:
        labels = w.clone()
        labels[: spec.prompt] = -100
        test.append({"input_ids": w, "labels": labels})
    return LMData(vocab, train, val, test)


def make_lm(spec: LMSpec, vocab_size: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=spec.seq_len,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).to(DTYPE).eval()


def mean_token_loss(model: nn.Module, examples: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per character) over the examples' loss positions."""
    task = CausalLMTask()
    with torch.no_grad():
        batch = task.collate(examples)
        total = float(task.loss(task.forward(model, batch), batch).sum())
        count = int((batch["labels"][:, 1:] != -100).sum())
    return total / count


def train_lm(spec: LMSpec, train: list[dict], vocab_size: int, lr: float, weight_decay: float, seed: int) -> nn.Module:
    """AdamW on the mean over sequences of the summed token loss (docs/method.md §1), batch 32."""
    model = make_lm(spec, vocab_size, seed).train()
    task = CausalLMTask()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    step = 0
    while step < spec.steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, spec.batch_size):
            batch = task.collate([train[int(j)] for j in perm[i : i + spec.batch_size]])
            opt.zero_grad(set_to_none=True)
            task.loss(task.forward(model, batch), batch).mean().backward()
            opt.step()
            step += 1
            if step >= spec.steps:
                break
    return model.eval()


@dataclass
class TrainedLM:
    model: nn.Module
    lr: float
    weight_decay: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def select_and_train_lm(spec: LMSpec, data: LMData, seed: int = 0) -> TrainedLM:
    """Train on every (lr, weight decay) of the grid; keep the lowest validation loss."""
    start = time.perf_counter()
    best, grid = None, []
    for lr, wd in itertools.product(spec.lrs, spec.weight_decays):
        model = train_lm(spec, data.train, len(data.vocab), lr, wd, seed)
        val = mean_token_loss(model, data.val)
        grid.append({"lr": lr, "weight_decay": wd, "val_loss": val, "train_loss": mean_token_loss(model, data.train)})
        if np.isfinite(val) and (best is None or val < best[0]):
            best = (val, lr, wd, model)
    if best is None:
        raise RuntimeError("language model: every (lr, weight decay) of the grid diverged")
    return TrainedLM(best[3], best[1], best[2], grid, time.perf_counter() - start)


__all__ = ["LMSpec", "LMData", "load_lm_data", "make_lm", "train_lm", "select_and_train_lm", "mean_token_loss", "prose_text", "MODULES"]
