"""The demo's tokenizer and model: a byte-level BPE and a small GPT-2 trained from scratch.

The model is trained on exactly the sequences ``SequenceStore.build`` (what
``lminfluence fit`` runs) cuts from the corpus, so the demo's influence run
scores the true training set.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    A space is put before the first word of every text (``add_prefix_space``),
    so "The first President ..." at the start of a query is the same tokens as
    in the middle of a document. EOS (also BOS, UNK and PAD) is ``<|endoftext|>``;
    nothing is added around a text (GPT-2's convention).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


@dataclass(frozen=True)
class TrainSettings:
    """How the demo model is built and trained.

    Attributes:
        n_layer, n_embd, n_head: GPT-2 shape (MLP width 4 × n_embd).
        epochs: passes over the training sequences, each in a fresh seeded order.
        batch_size: sequences per AdamW step.
        lr: peak learning rate (linear warm-up over the first 5% of steps, cosine decay to 10%).
        weight_decay: AdamW weight decay on matrices (not on biases, norms, embeddings).
    """

    n_layer: int
    n_embd: int
    n_head: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0


def make_model(vocab_size: int, max_length: int, settings: TrainSettings, seed: int) -> Any:
    """A fresh GPT2LMHeadModel (HF Conv1D layers), dropout off, seeded initialisation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_length,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def _batch(pieces: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], attention mask [B, T] and labels [B, T] (-100 on padding)."""
    length = max(len(p) for p in pieces)
    ids = torch.zeros(len(pieces), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(pieces):
        ids[b, : len(p)] = torch.tensor(p)
        mask[b, : len(p)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def train_model(model: Any, pieces: list[list[int]], settings: TrainSettings, seed: int, progress: bool = True) -> list[float]:
    """Train ``model`` in place on ``pieces`` with AdamW; the mean token loss of each epoch."""
    from ..progress import LogProgress
    from ..progress import progress as progress_bar

    rng = random.Random(f"lminfluence-demo-train-{seed}")
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    per_epoch = math.ceil(len(pieces) / settings.batch_size)
    total = per_epoch * settings.epochs
    warmup = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = progress_bar(total, "training demo model", "step") if progress else LogProgress(total, "", "", interval=float("inf"))
    for epoch in range(settings.epochs):
        order = list(range(len(pieces)))
        rng.shuffle(order)
        token_loss, tokens = 0.0, 0
        for start in range(0, len(order), settings.batch_size):
            ids, mask, labels = _batch([pieces[i] for i in order[start : start + settings.batch_size]])
            logits = model(input_ids=ids, attention_mask=mask).logits
            target = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: position t predicts t + 1
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            n = int((target != -100).sum())
            token_loss += loss.item() * n
            tokens += n
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        losses.append(token_loss / max(tokens, 1))
        logger.info("epoch %d/%d: mean token loss %.3f", epoch + 1, settings.epochs, losses[-1])
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def completion_stats(model: Any, tokenizer: Any, prompt: str, completion: str) -> dict[str, float | bool]:
    """Log p(completion | prompt) summed over its tokens, and whether greedy decoding produces it."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]  # [C, V]: the positions that predict c
    logp = torch.log_softmax(logits.float(), -1)
    target = torch.tensor(c)
    return {
        "log_prob": float(logp.gather(1, target[:, None]).sum()),
        "greedy": bool((logits.argmax(-1) == target).all()),  # teacher-forced argmax = greedy decoding
    }


__all__ = ["EOS", "train_tokenizer", "TrainSettings", "make_model", "train_model", "completion_stats"]
