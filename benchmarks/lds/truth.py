"""Retraining ground truth and the LDS of each method, with the library's ``lminfluence.evaluation``.

``build_truth`` wraps ``build_ground_truth`` (seeded half subsets, the ground
truth saved after every retraining, so a killed run resumes) and records the
time of each retraining. ``truth_diagnostics`` says how much of the
measurements' variation across subsets is the retraining seed's;
``summarize`` gives each method's LDS overall and per query group, ``paired``
its difference from a reference method query by query.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from lminfluence.evaluation import GroundTruth, build_ground_truth, lds
from lminfluence.storage.atomic import atomic_write_json

TIME_FILE = "retrain_time.json"


def build_truth(
    retrain: Callable[[np.ndarray, int], Any],
    measure: Callable[[Any], np.ndarray],
    num_train: int,
    out: Path,
    *,
    num_subsets: int,
    seeds: int,
    seed: int = 0,
    report_every: int = 0,
) -> tuple[GroundTruth, dict[str, float]]:
    """Retrain on ``num_subsets`` random halves × ``seeds`` seeds (resumable in ``out``).

    Args:
        retrain: (training indices, seed) -> a trained model.
        measure: model -> f of every query, [Q].
        num_train: N.
        out: the ground truth's directory; ``TIME_FILE`` there sums the
            retraining time over every run that added to it.
        num_subsets, seeds, seed: as ``build_ground_truth``'s M, S and seed.
        report_every: print a progress line after every this many retrainings (0: never).

    Returns the ground truth and ``{"seconds", "runs", "seconds_per_run"}``.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / TIME_FILE
    timing = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "runs": 0}
    session = []

    def train_fn(indices: np.ndarray, run_seed: int) -> np.ndarray:
        start = time.perf_counter()
        values = measure(retrain(indices, run_seed))
        session.append(time.perf_counter() - start)
        timing["seconds"] += session[-1]
        timing["runs"] += 1
        atomic_write_json(path, timing)  # before build_ground_truth saves the run: time may count a run twice, never zero times
        if report_every and len(session) % report_every == 0:
            print(f"  {len(session)} retrainings, {np.mean(session):.1f} s each", flush=True)
        return values

    truth = build_ground_truth(train_fn, num_train, out, num_subsets=num_subsets, seeds_per_subset=seeds, seed=seed)
    return truth, {**timing, "seconds_per_run": timing["seconds"] / max(timing["runs"], 1)}


def truth_diagnostics(truth: GroundTruth, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Is the ground truth signal or seed noise? Per query group (medians over its queries):

    - ``subset_sd``: standard deviation over subsets of f averaged over seeds;
    - ``seed_sd``: standard deviation of f between the seeds of one subset (pooled);
    - ``seed_share``: seed variance / total variance of single runs (0 = no seed noise);
    - ``seed_spearman``: Spearman over subsets between the first two seeds' f,
      how well one retraining ranks the subsets like another (1 = no noise);
    - ``ceiling``: √(S·r / (1 + (S-1)·r)) with r = ``seed_spearman`` (Spearman–Brown: the
      correlation of the S-seed mean with its expectation over seeds), roughly the best
      LDS a method that predicted the expected f exactly could reach.
    """
    m = truth.measurements  # [M, S, T]
    S = m.shape[1]
    if S < 2:
        raise ValueError("seed diagnostics need at least 2 seeds per subset")
    out = {}
    for g in ["all"] + sorted(set(groups.tolist())):
        cols = np.ones(len(groups), bool) if g == "all" else groups == g
        x = m[:, :, cols]
        within = x.var(axis=1, ddof=1).mean(0)  # [T]
        total = x.reshape(-1, x.shape[-1]).var(axis=0, ddof=1)
        r = np.array([_spearman(x[:, 0, t], x[:, 1, t]) for t in range(x.shape[-1])])
        r_med = float(np.nanmedian(r))
        out[g] = {
            "queries": int(cols.sum()),
            "subset_sd": float(np.median(x.mean(1).std(0, ddof=1))),
            "seed_sd": float(np.median(np.sqrt(within))),
            "seed_share": float(np.median(within / np.where(total > 0, total, np.nan))),
            "seed_spearman": r_med,
            "ceiling": math.sqrt(S * r_med / (1 + (S - 1) * r_med)) if r_med > 0 else float("nan"),
        }
    return out


def summarize(scores: dict[str, torch.Tensor], truth: GroundTruth, groups: np.ndarray) -> dict[str, dict[str, Any]]:
    """Each method's LDS: mean ± std over queries, overall and per group, with the per-query values."""
    out = {}
    for name, s in scores.items():
        per = lds(s, truth).per_measurement  # [T]
        row = {"per_query": [float(v) for v in per]}
        for g in ["all"] + sorted(set(groups.tolist())):
            vals = per if g == "all" else per[groups == g]
            vals = vals[np.isfinite(vals)]
            row[g] = {"mean": float(vals.mean()) if vals.size else float("nan"),
                      "std": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"),
                      "n": int(vals.size)}
        out[name] = row
    return out


def paired(summary: dict[str, dict[str, Any]], reference: str, groups: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Each method's LDS minus the reference's, query by query: mean, standard error, share of queries won.

    Queries differ far more from each other than methods do on one query, so a
    paired difference tells two methods apart long before their means ± std do.
    """
    ref = np.asarray(summary[reference]["per_query"])
    out = {}
    for name, row in summary.items():
        d = np.asarray(row["per_query"]) - ref
        out[name] = {}
        for g in ["all"] + sorted(set(groups.tolist())):
            x = d if g == "all" else d[groups == g]
            x = x[np.isfinite(x)]
            se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
            out[name][g] = {"mean": float(x.mean()) if x.size else float("nan"), "se": se, "wins": float((x > 0).mean()) if x.size else float("nan")}
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


__all__ = ["build_truth", "truth_diagnostics", "summarize", "paired", "TIME_FILE"]
