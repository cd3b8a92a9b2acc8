"""LDS, the linear datamodeling score (docs/method.md §8): do summed scores predict retraining?

Draw M random subsets of the training set (half of it by default), retrain on
each with several seeds, and record the measurements of T test queries. For
each query t, LDS is the Spearman correlation over the M subsets between the
measurement (mean over seeds) and the sum of the scores of the subset's
members, Σ_{i ∈ S_m} score[t, i]; the reported LDS is the mean over queries.
With the library's sign (positive = adding z raises f) a good method has LDS
near 1.

Retraining is the expensive part, so the ground truth (subsets, seeds,
measurements) is saved to a directory as it is produced (``ground_truth.npz``
rewritten atomically after each retraining, settings in ``lds.json``): an
interrupted run resumes, and any later method is scored against the same
retrainings with ``GroundTruth.load``.

Usage::

    from lminfluence.evaluation import GroundTruth, build_ground_truth, lds

    def train_fn(indices, seed):            # retrain on train[indices] with this seed
        model = fit([train[i] for i in indices], seed=seed)
        return [measure(model, q) for q in queries]          # the T measurements

    truth = build_ground_truth(train_fn, len(train), "lds/", num_subsets=100, seeds_per_subset=3)
    result = lds(scores.total, truth)       # scores [T, N] of the same T queries
    result.mean, result.per_measurement

    truth = GroundTruth.load("lds/")        # later: the same ground truth for another method
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ._files import check_settings, read_json, write_npz

logger = logging.getLogger(__name__)

SETTINGS_FILE = "lds.json"
DATA_FILE = "ground_truth.npz"


@dataclass
class GroundTruth:
    """Retraining results on random subsets.

    Attributes:
        subsets: [M, K] training indices of each subset (sorted).
        seeds: [M, S] the seed of each retraining.
        measurements: [M, S, T] the measurements; NaN where not trained yet
            ([M, S, 0] before the first retraining).
        num_train: N, the size of the full training set.
        meta: the settings that drew the subsets and seeds.
    """

    subsets: np.ndarray
    seeds: np.ndarray
    measurements: np.ndarray
    num_train: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def missing(self) -> list[tuple[int, int]]:
        """(subset, seed) pairs not trained yet."""
        M, S = self.seeds.shape
        if self.measurements.shape[-1] == 0:
            return [(m, s) for m in range(M) for s in range(S)]
        todo = np.isnan(self.measurements).any(-1)
        return [(int(m), int(s)) for m, s in zip(*np.nonzero(todo))]

    @property
    def complete(self) -> bool:
        return not self.missing

    def mean_measurements(self) -> np.ndarray:
        """[M, T] the measurements averaged over seeds."""
        if not self.complete:
            raise ValueError(
                f"the ground truth is incomplete: {len(self.missing)} of {self.seeds.size} retrainings are missing; "
                "run build_ground_truth again with the same output_dir to finish it"
            )
        return self.measurements.mean(1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        check_settings(path / SETTINGS_FILE, self.meta, "LDS ground truth")
        write_npz(path / DATA_FILE, subsets=self.subsets, seeds=self.seeds, measurements=self.measurements)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        path = Path(path)
        if not (path / SETTINGS_FILE).is_file() or not (path / DATA_FILE).is_file():
            raise FileNotFoundError(f"no LDS ground truth at {path} ({SETTINGS_FILE} and {DATA_FILE} expected)")
        meta = read_json(path / SETTINGS_FILE)
        with np.load(path / DATA_FILE) as z:
            return cls(z["subsets"], z["seeds"], z["measurements"], int(meta["num_train"]), meta)


def make_subsets(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """M random subsets of round(fraction · N) distinct training indices each, sorted, [M, K]."""
    size = int(round(fraction * num_train))
    if not 0 < size < num_train:
        raise ValueError(f"fraction={fraction} of {num_train} training examples gives subsets of {size}; need 0 < size < N")
    rng = np.random.default_rng(seed)
    return np.sort(np.stack([rng.choice(num_train, size, replace=False) for _ in range(num_subsets)]), axis=1)


def build_ground_truth(
    train_fn: Callable[[np.ndarray, int], Sequence[float] | np.ndarray | torch.Tensor],
    num_train: int,
    output_dir: str | Path | None = None,
    *,
    num_subsets: int = 50,
    fraction: float = 0.5,
    seeds_per_subset: int = 2,
    seed: int = 0,
) -> GroundTruth:
    """Retrain on random subsets and record the measurements (resumable through ``output_dir``).

    Args:
        train_fn: (training indices [K], seed) -> the T measurements of the
            model trained on those examples with that seed.
        num_train: N, the size of the training set.
        output_dir: where the ground truth is kept; a previous run's retrainings
            there are reused, and its settings must match these.
        num_subsets: M.
        fraction: subset size as a share of N (the paper's LDS: one half).
        seeds_per_subset: S retrainings per subset, averaged.
        seed: draws the subsets and the retraining seeds.
    """
    for name, value in (("num_train", num_train), ("num_subsets", num_subsets), ("seeds_per_subset", seeds_per_subset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    meta = {"num_train": num_train, "num_subsets": num_subsets, "fraction": float(fraction), "seeds_per_subset": seeds_per_subset, "seed": seed}
    path = Path(output_dir) if output_dir is not None else None
    if path is not None and (path / DATA_FILE).is_file():
        check_settings(path / SETTINGS_FILE, meta, "LDS ground truth")
        truth = GroundTruth.load(path)
    else:
        subsets = make_subsets(num_train, num_subsets, fraction, seed)
        seeds = np.random.default_rng([seed, 1]).integers(0, 2**31 - 1, size=(num_subsets, seeds_per_subset))
        truth = GroundTruth(subsets, seeds, np.zeros((num_subsets, seeds_per_subset, 0)), num_train, meta)
        if path is not None:
            truth.save(path)
    todo = truth.missing
    if len(todo) < truth.seeds.size:
        logger.info("LDS: %d of %d retrainings already done", truth.seeds.size - len(todo), truth.seeds.size)
    for m, s in tqdm(todo, desc="lds retrain", disable=None, leave=False):
        values = train_fn(truth.subsets[m].copy(), int(truth.seeds[m, s]))
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            raise ValueError(f"train_fn returned non-finite measurements for subset {m}, seed {truth.seeds[m, s]}")
        if truth.measurements.shape[-1] == 0:
            truth.measurements = np.full(truth.seeds.shape + (values.size,), np.nan)
        if values.size != truth.measurements.shape[-1]:
            raise ValueError(f"train_fn returned {values.size} measurements, earlier calls {truth.measurements.shape[-1]}")
        truth.measurements[m, s] = values
        if path is not None:
            write_npz(path / DATA_FILE, subsets=truth.subsets, seeds=truth.seeds, measurements=truth.measurements)
    return truth


@dataclass
class LDSResult:
    """The linear datamodeling score.

    Attributes:
        mean: the mean over measurements of ``per_measurement`` (NaN entries left out).
        per_measurement: [T] Spearman correlation over subsets for each measurement
            (NaN where either side is constant).
        predicted: [M, T] the summed scores of each subset's members.
        actual: [M, T] the measurements, averaged over seeds.
    """

    mean: float
    per_measurement: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray


def lds(scores: torch.Tensor | np.ndarray, ground_truth: GroundTruth) -> LDSResult:
    """Spearman correlation between Σ_{i ∈ S_m} score[t, i] and the retrained measurement t.

    Args:
        scores: [T, N] a method's scores of every training example on the T
            measured queries (in the order ``train_fn`` returns them).
        ground_truth: from ``build_ground_truth`` or ``GroundTruth.load``.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None]
    actual = ground_truth.mean_measurements()  # [M, T]
    T, N = scores.shape
    if N != ground_truth.num_train:
        raise ValueError(f"scores cover {N} training examples but the ground truth was built on {ground_truth.num_train}")
    if T != actual.shape[1]:
        raise ValueError(f"scores have {T} measurements (rows) but the ground truth records {actual.shape[1]}")
    predicted = scores[:, ground_truth.subsets].sum(-1).T  # [T, M, K] -> [M, T]
    per = np.array([_spearman(predicted[:, t], actual[:, t]) for t in range(T)])
    if np.isnan(per).any():
        logger.warning("LDS: %d of %d measurements have constant predictions or outcomes (no correlation)", int(np.isnan(per).sum()), T)
    mean = float(np.nanmean(per)) if not np.isnan(per).all() else float("nan")
    return LDSResult(mean=mean, per_measurement=per, predicted=predicted, actual=actual)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


__all__ = ["GroundTruth", "LDSResult", "build_ground_truth", "make_subsets", "lds"]
