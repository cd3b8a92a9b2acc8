"""The two MLP tasks of the study: data, models, training and their influence Tasks.

- ``diabetes``: regression MLP, two hidden layers of 128 tanh units (the
  paper's Concrete/Energy setup), on scikit-learn's bundled diabetes data.
- ``digits``: classification MLP, two hidden layers of 256 ReLU units (the
  paper's MNIST setup), on scikit-learn's bundled 8×8 digits.

Both are trained as the paper did: SGD with batch size 128, learning rate and
weight decay picked on a validation split. Models are float64: the PBRF is a
finite difference (f(θ_ε) - f(θ_s)) / ε, which float32 round-off would swamp.

Measurement (the same convention as the library's language-model queries,
f = log p(completion | prompt)): the log-likelihood of the test label,
f = -½(h - y)² for regression (Gaussian, unit variance, constant dropped) and
f = log softmax(h)_y for classification, i.e. minus the test loss.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lminfluence import Task
from lminfluence.task.causal_lm import sample_categorical

DTYPE = torch.float64
MODULES = ("*",)  # every nn.Linear of the nn.Sequential ("0", "2", "4")


# ------------------------------------------------------------------ tasks


def _collate(examples, y_dtype) -> dict[str, torch.Tensor]:
    return {
        "x": torch.stack([torch.as_tensor(e["x"]) for e in examples]),
        "y": torch.stack([torch.as_tensor(e["y"]) for e in examples]).reshape(-1).to(y_dtype),
    }


class RegressionTask(Task):
    """Examples {"x": [D], "y": scalar}; L = ½(h - y)², f = -½(h - y)².

    Pseudo-labels: the output Hessian of ½(h - y)² is 1, so the Gauss–Newton
    matrix is E[J Jᵀ]; the label y' = h - 1 gives the pseudo-gradient J·1
    exactly (sampling y' ~ N(h, 1) would give the same matrix in expectation,
    with noise).
    """

    def collate(self, examples):
        return _collate(examples, DTYPE)

    def forward(self, model, batch):
        return model(batch["x"]).reshape(-1)

    def loss(self, outputs, batch):
        return 0.5 * (outputs - batch["y"]) ** 2

    def sampled_loss(self, outputs, batch, generator):
        return 0.5 * (outputs - (outputs.detach() - 1.0)) ** 2

    def measurement(self, outputs, batch):
        return -0.5 * (outputs - batch["y"]) ** 2


class ClassificationTask(Task):
    """Examples {"x": [D], "y": class}; L = cross-entropy, f = log p(y | x).

    Pseudo-labels are drawn from softmax(h), one per example (docs/method.md §3).
    """

    def collate(self, examples):
        return _collate(examples, torch.long)

    def forward(self, model, batch):
        return model(batch["x"])

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch["y"], reduction="none")

    def sampled_loss(self, outputs, batch, generator):
        with torch.no_grad():
            drawn = sample_categorical(outputs.detach(), generator)
        return F.cross_entropy(outputs, drawn, reduction="none")

    def measurement(self, outputs, batch):
        return -F.cross_entropy(outputs, batch["y"], reduction="none")


# ------------------------------------------------------------------- data


@dataclass
class Split:
    """Standardised tensors of one split: x [N, D], y [N] (float64 targets or long classes)."""

    x: torch.Tensor
    y: torch.Tensor

    def examples(self, index=None) -> list[dict[str, torch.Tensor]]:
        idx = range(len(self.y)) if index is None else index
        return [{"x": self.x[i], "y": self.y[i]} for i in idx]

    def subset(self, index) -> "Split":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Split(self.x[index], self.y[index])


@dataclass
class MLPSpec:
    """Everything that defines one MLP task."""

    name: str
    kind: str  # "regression" | "classification"
    hidden: int
    activation: type[nn.Module]
    epochs: int
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    batch_size: int = 128
    momentum: float = 0.9


SPECS = {
    "diabetes": MLPSpec("diabetes", "regression", 128, nn.Tanh, epochs=200, lrs=(0.003, 0.01, 0.03), weight_decays=(1e-4, 1e-3, 1e-2)),
    "digits": MLPSpec("digits", "classification", 256, nn.ReLU, epochs=40, lrs=(0.01, 0.03, 0.1), weight_decays=(1e-4, 1e-3, 1e-2)),
}


def load_splits(name: str, seed: int = 0, val_frac: float = 0.15, test_frac: float = 0.15) -> dict[str, Split]:
    """Train/validation/test splits of a bundled scikit-learn data set, standardised on train.

    Features are standardised per column with the training mean and standard
    deviation (constant columns, such as the digits' border pixels, are only
    centred); regression targets likewise.
    """
    from sklearn.datasets import load_diabetes, load_digits

    loader = {"diabetes": load_diabetes, "digits": load_digits}[name]
    data = loader()
    x, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = int(round(test_frac * len(x))), int(round(val_frac * len(x)))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    tr = parts["train"]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd[sd < 1e-8] = 1.0
    x = (x - mu) / sd
    if SPECS[name].kind == "regression":
        y = (y - y[tr].mean()) / y[tr].std()
        y_t = torch.tensor(y, dtype=DTYPE)
    else:
        y_t = torch.tensor(y, dtype=torch.long)
    x_t = torch.tensor(x, dtype=DTYPE)
    return {k: Split(x_t[torch.as_tensor(v)], y_t[torch.as_tensor(v)]) for k, v in parts.items()}


def num_outputs(spec: MLPSpec, splits: dict[str, Split]) -> int:
    return 1 if spec.kind == "regression" else int(splits["train"].y.max()) + 1


def make_mlp(spec: MLPSpec, d_in: int, d_out: int, seed: int) -> nn.Sequential:
    """Linear → act → Linear → act → Linear; the Linear layers are modules "0", "2", "4"."""
    torch.manual_seed(seed)
    h = spec.hidden
    return nn.Sequential(
        nn.Linear(d_in, h), spec.activation(), nn.Linear(h, h), spec.activation(), nn.Linear(h, d_out)
    ).to(DTYPE)


def make_task(spec: MLPSpec) -> Task:
    return RegressionTask() if spec.kind == "regression" else ClassificationTask()


# --------------------------------------------------------------- training


def _loss(spec: MLPSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if spec.kind == "regression":
        return 0.5 * (out.reshape(-1) - y).square().mean()
    return F.cross_entropy(out, y)


def train_mlp(spec: MLPSpec, train: Split, d_out: int, lr: float, weight_decay: float, seed: int) -> nn.Sequential:
    """SGD (momentum 0.9), batch 128, ``spec.epochs`` epochs, on the mean training loss."""
    model = make_mlp(spec, train.x.shape[1], d_out, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=spec.momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(train.y)
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, spec.batch_size):
            idx = perm[i : i + spec.batch_size]
            opt.zero_grad(set_to_none=True)
            _loss(spec, model, train.x[idx], train.y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(spec: MLPSpec, model: nn.Module, split: Split) -> dict[str, float]:
    """Mean loss (½ squared error or cross-entropy) and, for classification, accuracy."""
    out = model(split.x)
    res = {"loss": float(_loss(spec, model, split.x, split.y))}
    if spec.kind == "classification":
        res["accuracy"] = float((out.argmax(1) == split.y).double().mean())
    return res


@torch.no_grad()
def constant_baseline(spec: MLPSpec, train: Split, split: Split) -> float:
    """Loss of the best constant predictor fitted on train (mean target / class frequencies)."""
    if spec.kind == "regression":
        return float(0.5 * (split.y - train.y.mean()).square().mean())
    freq = torch.bincount(train.y, minlength=int(train.y.max()) + 1).double() / len(train.y)
    return float(-freq.clamp_min(1e-12).log()[split.y].mean())


@dataclass
class Trained:
    model: nn.Sequential
    lr: float
    weight_decay: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def select_and_train(spec: MLPSpec, splits: dict[str, Split], seed: int = 0) -> Trained:
    """Train on every (lr, weight decay) of the grid; keep the one with the lowest validation loss."""
    start = time.perf_counter()
    d_out = num_outputs(spec, splits)
    best, grid = None, []
    for lr, wd in itertools.product(spec.lrs, spec.weight_decays):
        model = train_mlp(spec, splits["train"], d_out, lr, wd, seed)
        val = evaluate(spec, model, splits["val"])
        ok = bool(np.isfinite(val["loss"]))
        grid.append({"lr": lr, "weight_decay": wd, **{f"val_{k}": v for k, v in val.items()}})
        if ok and (best is None or val["loss"] < best[0]):
            best = (val["loss"], lr, wd, model)
    if best is None:
        raise RuntimeError(f"{spec.name}: every (lr, weight decay) of the grid diverged")
    return Trained(best[3], best[1], best[2], grid, time.perf_counter() - start)


__all__ = [
    "RegressionTask",
    "ClassificationTask",
    "Split",
    "MLPSpec",
    "SPECS",
    "load_splits",
    "make_mlp",
    "make_task",
    "num_outputs",
    "train_mlp",
    "evaluate",
    "constant_baseline",
    "select_and_train",
    "Trained",
    "MODULES",
    "DTYPE",
]
