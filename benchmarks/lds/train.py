"""The model of the LDS benchmark: the demo's small GPT-2, trained (and retrained) by the demo's trainer.

``train_on`` is the one recipe used for the scored model (every training
sequence) and for every retraining (a random half): ``make_model`` and
``train_model`` of ``lminfluence.demo.model`` (AdamW, linear warm-up, cosine
decay, gradient clipping; the same number of epochs whatever the subset).

The retraining seed sets the order of the training sequences. The initial
weights are those of the scored model (``ModelSpec.init_seed``) unless
``vary_init`` is set, in which case the seed draws them too. Fixed
initialisation asks the question influence functions answer, how this
training run would have ended on other data, and cuts the seed noise of the
held-out measurements (seed share of variance 0.30 against 0.46; docs/accuracy.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lminfluence import CausalLMTask
from lminfluence.demo.model import TrainSettings, make_model, train_model

from .corpus import Corpus


@dataclass(frozen=True)
class ModelSpec:
    """GPT-2 shape and training recipe (see ``lminfluence.demo.model.TrainSettings``).

    Attributes:
        init_seed: initial weights of the scored model, and of every retraining
            unless ``vary_init``.
        vary_init: draw each retraining's initial weights from its seed.
        modules: the tracked layers (``FactorConfig.modules``).
    """

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    epochs: int = 16
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    init_seed: int = 0
    vary_init: bool = False
    modules: tuple[str, ...] = ("mlp", "attention")

    def settings(self) -> TrainSettings:
        return TrainSettings(self.n_layer, self.n_embd, self.n_head, self.epochs, self.batch_size, self.lr, self.weight_decay)


def train_on(corpus: Corpus, spec: ModelSpec, indices: np.ndarray, seed: int) -> Any:
    """A fresh model trained on ``corpus.store[indices]`` with the recipe of ``spec``; seed = data order."""
    pieces = [corpus.store.tokens(int(i)).tolist() for i in indices]
    model = make_model(len(corpus.tokenizer), corpus.max_length, spec.settings(), seed if spec.vary_init else spec.init_seed)
    train_model(model, pieces, spec.settings(), seed, progress=False)
    return model.eval()


@torch.no_grad()
def measure(model: Any, examples: list[dict]) -> np.ndarray:
    """f = log p(completion | prompt) of every query, [Q] float64 (METHOD.md §1)."""
    task = CausalLMTask()
    batch = task.collate(examples)
    return task.measurement(task.forward(model, batch), batch).double().numpy()


@torch.no_grad()
def token_loss(model: Any, examples: list[dict]) -> float:
    """Mean next-token cross-entropy (nats per token) over the examples' loss-carrying positions."""
    task = CausalLMTask()
    batch = task.collate(examples)
    total = float(task.loss(task.forward(model, batch), batch).sum())
    return total / int((batch["labels"][:, 1:] != -100).sum())


def scored_model(corpus: Corpus, spec: ModelSpec, cache: Path) -> tuple[Any, dict[str, Any]]:
    """The model trained on every training sequence (the one scored), trained once and cached."""
    from transformers import GPT2LMHeadModel

    key = json.loads(json.dumps(asdict(replace(spec, vary_init=False))))  # vary_init is about the retrainings only
    info_path, model_dir = cache / "model.json", cache / "model"
    if info_path.is_file() and (model_dir / "model.safetensors").is_file():
        info = json.loads(info_path.read_text())
        if info["spec"] == key:
            return GPT2LMHeadModel.from_pretrained(model_dir).eval(), info
    start = time.perf_counter()
    model = train_on(corpus, spec, np.arange(len(corpus.store)), spec.init_seed)
    seconds = time.perf_counter() - start
    groups = corpus.groups()
    f = measure(model, corpus.examples)
    info = {
        "spec": key,
        "train_seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss": token_loss(model, corpus.train),
        "query_loss": {str(g): token_loss(model, [e for e, h in zip(corpus.examples, groups) if h == g]) for g in sorted(set(groups))},
        "mean_f": {str(g): float(f[groups == g].mean()) for g in sorted(set(groups))},
    }
    model.save_pretrained(model_dir, safe_serialization=True)
    info_path.write_text(json.dumps(info, indent=1))
    return model, info


__all__ = ["ModelSpec", "train_on", "measure", "token_loss", "scored_model"]
