"""LDS of every method on one task, with the library's ground truth (lminfluence.evaluation.lds)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .study import Setup, load_json, mean_std, save_json


def run_lds(setup: Setup, scores: dict[str, torch.Tensor], num_subsets: int, seeds: int, out: Path, seed: int = 0) -> dict:
    """Retrain ``setup`` on ``num_subsets`` random halves × ``seeds`` seeds (resumable), then LDS per method.

    The measurement of a retrained model is the same f as the scores': the
    queries' ``task.measurement``. Returns per method the mean ± std over
    queries of the Spearman correlation, and the retraining time.
    """
    from lminfluence.evaluation import build_ground_truth, lds

    if setup.retrain is None:
        raise ValueError(f"{setup.name}: no retraining function, no LDS")
    timing = load_json(out / "time.json") or {"seconds": 0.0, "runs": 0}

    def train_fn(indices: np.ndarray, run_seed: int) -> torch.Tensor:
        start = time.perf_counter()
        values = setup.measure(setup.retrain(indices, run_seed))
        timing["seconds"] += time.perf_counter() - start
        timing["runs"] += 1
        save_json(out / "time.json", timing)
        return values

    truth = build_ground_truth(
        train_fn, len(setup.train), out, num_subsets=num_subsets, seeds_per_subset=seeds, seed=seed
    )
    methods = {}
    for m, s in scores.items():
        res = lds(s, truth)
        per_q = [float(v) for v in res.per_measurement]
        mean, std = mean_std(per_q)
        methods[m] = {"mean": mean, "std": std, "per_query": per_q}
    return {
        "methods": methods,
        "num_subsets": num_subsets,
        "seeds": seeds,
        "retrain_seconds": timing["seconds"],
        "seconds_per_retrain": timing["seconds"] / max(timing["runs"], 1),
        # how much of the measurement's variation across subsets is seed noise (an LDS ceiling)
        "seed_noise": _seed_noise(truth.measurements),
    }


def _seed_noise(measurements: np.ndarray) -> float:
    """Mean over queries of var(within subset, across seeds) / var(of all runs): 0 = no seed noise."""
    if measurements.shape[1] < 2:
        return float("nan")
    within = measurements.var(axis=1, ddof=1).mean(0)  # [T]
    total = measurements.reshape(-1, measurements.shape[-1]).var(axis=0, ddof=1)  # [T]
    return float(np.mean(within / np.where(total > 0, total, np.nan)))


__all__ = ["run_lds"]
