"""Build (or reload from the cache) the trained model of each task as a ``Setup``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lminfluence import CausalLMTask

from . import lm as lmmod
from . import tasks as mlp
from .study import Setup, load_json, load_tensors, save_json, save_tensors

logger = logging.getLogger("accuracy")

TASKS = ("diabetes", "digits", "lm")
N_QUERIES = 10


def _scored(n_train: int, n_scored: int, seed: int) -> np.ndarray:
    """Which training points are compared with the PBRF: all of them, or a seeded random subset."""
    if n_scored >= n_train:
        return np.arange(n_train)
    return np.sort(np.random.default_rng(seed).choice(n_train, size=n_scored, replace=False))


def mlp_setup(name: str, out: Path, n_scored: int, lissa: dict, seed: int = 0, epochs: int | None = None) -> Setup:
    """The trained MLP of ``name`` ("diabetes" or "digits"); trained once, then read from ``out``."""
    spec = mlp.SPECS[name]
    if epochs is not None:
        from dataclasses import replace

        spec = replace(spec, epochs=epochs)
    splits = mlp.load_splits(name, seed=seed)
    d_in, d_out = splits["train"].x.shape[1], mlp.num_outputs(spec, splits)
    info = load_json(out / "model.json")
    state = load_tensors(out / "model.pt")
    if info is None or state is None or info.get("epochs") != spec.epochs:
        trained = mlp.select_and_train(spec, splits, seed=seed)
        model = trained.model
        info = {
            "epochs": spec.epochs,
            "lr": trained.lr,
            "weight_decay": trained.weight_decay,
            "grid": trained.grid,
            "train_seconds": trained.seconds,
            "train": mlp.evaluate(spec, model, splits["train"]),
            "test": mlp.evaluate(spec, model, splits["test"]),
            "test_constant_loss": mlp.constant_baseline(spec, splits["train"], splits["test"]),
            "sizes": {k: len(v.y) for k, v in splits.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        save_tensors(out / "model.pt", model.state_dict())
        save_json(out / "model.json", info)
    else:
        model = mlp.make_mlp(spec, d_in, d_out, seed)
        model.load_state_dict(state)
        model.eval()
    train = splits["train"]
    queries = splits["test"].examples(range(N_QUERIES))

    def retrain(subset: np.ndarray, run_seed: int):
        return mlp.train_mlp(spec, train.subset(subset), d_out, info["lr"], info["weight_decay"], run_seed)

    return Setup(
        name=name,
        model=model,
        task=mlp.make_task(spec),
        train=train.examples(),
        queries=queries,
        modules=mlp.MODULES,
        scored=_scored(len(train.y), n_scored, seed),
        info=info,
        retrain=retrain,
        batch_size=128,
        lissa=lissa,
    )


def lm_setup(out: Path, spec: lmmod.LMSpec, n_scored: int, lissa: dict, seed: int = 0) -> Setup:
    """The trained character-level GPT-2; trained once, then read from ``out``."""
    data = lmmod.load_lm_data(spec, seed=seed)
    info = load_json(out / "model.json")
    state = load_tensors(out / "model.pt")
    spec_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.__dict__.items()}
    if info is None or state is None or info.get("spec") != spec_dict:
        trained = lmmod.select_and_train_lm(spec, data, seed=seed)
        model = trained.model
        info = {
            "spec": spec_dict,
            "lr": trained.lr,
            "weight_decay": trained.weight_decay,
            "grid": trained.grid,
            "train_seconds": trained.seconds,
            "train_loss": lmmod.mean_token_loss(model, data.train),
            "test_loss": lmmod.mean_token_loss(model, data.test),
            "uniform_loss": float(np.log(len(data.vocab))),
            "vocab": len(data.vocab),
            "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        save_tensors(out / "model.pt", model.state_dict())
        save_json(out / "model.json", info)
    else:
        model = lmmod.make_lm(spec, len(data.vocab), seed)
        model.load_state_dict(state)
        model.eval()

    def retrain(subset: np.ndarray, run_seed: int):
        return lmmod.train_lm(spec, [data.train[int(i)] for i in subset], len(data.vocab), info["lr"], info["weight_decay"], run_seed)

    return Setup(
        name="lm",
        model=model,
        task=CausalLMTask(),
        train=data.train,
        queries=data.test[:N_QUERIES],
        modules=lmmod.MODULES,
        scored=_scored(len(data.train), n_scored, seed),
        info=info,
        retrain=retrain,
        batch_size=32,
        lissa=lissa,
    )


__all__ = ["mlp_setup", "lm_setup", "TASKS", "N_QUERIES"]
