"""The score stage: queries → (TF-IDF candidates) → low-rank scan → full-rank re-score → details.

1. Candidates (METHOD.md §6): the top K sequences of each query by TF-IDF;
   the scan scores every query against the union and keeps each query's own.
2. Scan: queries preconditioned once (rank R when asked: §3.2.2 query
   batching), training sequences streamed in chunks. Each finished chunk is
   saved, so a restarted run skips it.
3. Re-score (the two-stage procedure): each query's top and bottom M at full rank.
4. Details: per-layer (Eq 30) and per-token (Eq 31) scores of the sequences shown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Execution, ScoreConfig
from ..corpus.readers import Query, read_queries
from ..errors import InputError
from ..corpus.sequences import SequenceStore
from ..filtering.tfidf import TfidfIndex
from ..scoring.pairwise import precondition_queries, score_preconditioned
from ..storage import layout
from ..passes import collate_to
from ..storage.atomic import atomic_write, atomic_write_json, atomic_write_npz
from ..task.causal_lm import CausalLMTask, examples_from_pairs
from .config import RunConfig
from .fitting import load_run_factors
from .model import context_length, load_model, load_tokenizer
from .rundir import RunDir, now

logger = logging.getLogger(__name__)


@dataclass
class Shown:
    """The sequences shown for one query with their details."""

    indices: np.ndarray  # [n] columns of the scanned union, best first, then the most negative
    ranks: np.ndarray  # [n] 1..k for the top, -1..-k for the bottom
    total: np.ndarray  # [n]
    per_layer: dict[str, np.ndarray]  # layer → [n]
    per_token: np.ndarray  # [n, T]


def query_examples(tokenizer: Any, queries: Sequence[Query], model) -> list[dict]:
    try:
        examples = examples_from_pairs(tokenizer, [(q.prompt, q.completion) for q in queries])
    except ValueError as e:
        raise InputError(f"queries: {e}") from e
    ctx = context_length(model)
    for q, ex in zip(queries, examples):
        n = len(ex["input_ids"])
        if ctx is not None and n > ctx:
            raise InputError(f"query {q.id!r} has {n} tokens, more than the model's context of {ctx}")
        if all(label == -100 for label in ex["labels"]):
            raise InputError(f"query {q.id!r}: the completion adds no token after the prompt")
    return examples


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class Partial:
    """Finished pieces of an unfinished scoring pass, keyed so a changed run never mixes in old ones."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        key_file = root / "key.json"
        if key_file.is_file() and json.loads(key_file.read_text()).get("key") != key:
            for f in root.glob("*.np[yz]"):
                f.unlink()
            logger.info("discarding partial results of another configuration in %s", root)
        atomic_write_json(key_file, {"key": key})

    def path(self, name: str) -> Path:
        return self.root / name

    def save_npy(self, name: str, array: np.ndarray) -> None:
        atomic_write_npz(self.path(name), array)

    def load_npy(self, name: str) -> np.ndarray | None:
        p = self.path(name)
        return np.load(p) if p.is_file() else None


def _score_config(s, rank: int | None, *, details: bool = False) -> ScoreConfig:
    return ScoreConfig(
        damping_scale=s.damping_scale,
        damping=s.damping,
        query_rank=rank,
        per_layer=details,
        per_token=details,
        algorithm="auto" if details else s.algorithm,
    )


def _execution(s) -> Execution:
    return Execution(batch_size=s.batch_size, query_batch_size=s.query_batch_size)


def _groups(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def scan(model, factors, examples, store: SequenceStore, union: np.ndarray, mask: np.ndarray, s, partial: Partial, task) -> np.ndarray:
    """First-stage scores [Q, U] against the sequences ``union``, chunk by chunk; NaN where ``mask`` [Q, U] is False.

    Rank-R queries are small, so all of them share one pass over the union;
    dense ones go in groups (memory), each group over its own candidates only.
    """
    Q = len(examples)
    groups = [np.arange(Q)] if s.rank is not None else _groups(Q, s.query_batch_size)
    out = np.full((Q, len(union)), np.nan)
    cfg = _score_config(s, s.rank)
    columns = [np.flatnonzero(mask[qs].any(axis=0)) for qs in groups]
    overall = tqdm(total=sum(len(c) for c in columns), desc="scan (all chunks)", unit="seq", disable=None)
    for g, (qs, cols) in enumerate(zip(groups, columns)):
        chunks = [(c, cols[c : c + s.chunk_size]) for c in range(0, len(cols), s.chunk_size)]
        todo = [c for c, _ in chunks if not partial.path(f"scan-{g:04d}-{c:010d}.npy").is_file()]
        if len(todo) < len(chunks):
            logger.info("scan, query group %d: %d of %d chunks already done", g, len(chunks) - len(todo), len(chunks))
        pq = precondition_queries(model, factors, [examples[i] for i in qs], cfg, task=task, execution=_execution(s), curvature_data=store) if todo else None
        for c, part in chunks:
            name = f"scan-{g:04d}-{c:010d}.npy"
            block = partial.load_npy(name)
            if block is None:
                block = score_preconditioned(model, factors, pq, store.subset(union[part]), cfg, task=task, execution=_execution(s)).total.double().numpy()
                partial.save_npy(name, block)
            out[np.ix_(qs, part)] = block
            overall.update(len(part))
    overall.close()
    out[~mask] = np.nan  # each query keeps its own candidates
    return out


def _ends(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the k largest finite entries (largest first) and of the k most negative ones (most negative first)."""
    valid = np.flatnonzero(np.isfinite(row))
    order = valid[np.lexsort((valid, -row[valid]))]  # by score, ties → lower index
    top = order[:k]
    rest = order[k:][::-1]
    return top, rest[row[rest] < 0][:k]


def refine(model, factors, examples, store, union: np.ndarray, first: np.ndarray, s, partial: Partial, task) -> tuple[np.ndarray, list[Shown]]:
    """Re-score the ends of each query at full rank (when asked) and compute the shown sequences' details.

    Returns the final score matrix (first-stage entries replaced where
    re-scored) and each query's shown sequences, chosen among the re-scored
    ones when there was a re-score.
    """
    final = first.copy()
    choice = first.copy()  # the rows the shown sequences are picked from
    rank = None if s.rescore_top else s.rank
    detail_cfg = _score_config(s, rank, details=True)
    shown: list[Shown] = []
    for g, qs in enumerate(_groups(len(examples), s.query_batch_size)):
        pq = None
        if s.rescore_top:
            saved = partial.path(f"rescore-{g:04d}.npz")
            if saved.is_file():
                with np.load(saved) as z:
                    idx, block = z["idx"], z["scores"]
            else:
                pq = precondition_queries(model, factors, [examples[i] for i in qs], detail_cfg, task=task, execution=_execution(s), curvature_data=store)
                idx = np.unique(np.concatenate([np.concatenate(_ends(first[q], s.rescore_top)) for q in qs]))
                block = score_preconditioned(model, factors, pq, store.subset(union[idx]), _score_config(s, None), task=task, execution=_execution(s)).total.double().numpy()
                atomic_write_npz(saved, idx=idx, scores=block)
            for j, q in enumerate(qs):
                # this query's own ends only: the group's union must not change what is shown
                keep = np.isin(idx, np.concatenate(_ends(first[q], s.rescore_top)))
                final[q, idx[keep]] = block[j, keep]
                choice[q] = np.nan
                choice[q, idx[keep]] = block[j, keep]
        for j, q in enumerate(qs):
            name = f"detail-{q:06d}.npz"
            if not partial.path(name).is_file():
                if pq is None:
                    pq = precondition_queries(model, factors, [examples[i] for i in qs], detail_cfg, task=task, execution=_execution(s), curvature_data=store)
                top, bottom = _ends(choice[q], s.top)
                cols = np.concatenate([top, bottom])
                one = {n: lq.select([j]) for n, lq in pq.items()}
                sc = score_preconditioned(model, factors, one, store.subset(union[cols]), detail_cfg, task=task, execution=_execution(s))
                arrays = {
                    "cols": cols,
                    "ranks": np.concatenate([np.arange(1, len(top) + 1), -np.arange(1, len(bottom) + 1)]),
                    "total": sc.total[0].double().numpy(),
                    "per_token": sc.per_token[0].double().numpy(),  # type: ignore[index]
                    "layers": np.asarray(list(sc.per_layer)),  # type: ignore[arg-type]
                    "per_layer": np.stack([v[0].double().numpy() for v in sc.per_layer.values()]),  # type: ignore[union-attr]
                }
                atomic_write_npz(partial.path(name), **arrays)
            with np.load(partial.path(name)) as z:
                shown.append(
                    Shown(
                        indices=z["cols"],
                        ranks=z["ranks"],
                        total=z["total"],
                        per_layer={str(n): z["per_layer"][i] for i, n in enumerate(z["layers"])},
                        per_token=z["per_token"],
                    )
                )
    return final, shown


@torch.no_grad()
def log_probs(model, examples: Sequence[dict], task: CausalLMTask, batch_size: int) -> np.ndarray:
    """log p(completion | prompt) of each query under the model (the measurement f)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_to(task, examples[i : i + batch_size], device)
        out.append(task.measurement(task.forward(model, batch), batch).double().cpu())
    return torch.cat(out).numpy()


def candidates(rd: RunDir, store: SequenceStore, examples: Sequence[dict], k: int | None):
    """(union of candidate sequence indices [U], TF-IDF scores [Q, U] or None, candidate mask [Q, U])."""
    Q, N = len(examples), len(store)
    if k is None or k >= N:
        return np.arange(N), None, np.ones((Q, N), dtype=bool)
    index_path = rd / layout.TFIDF_FILE
    if index_path.is_file():
        index = TfidfIndex.load(index_path)
    else:
        t0 = time.perf_counter()
        index = TfidfIndex.build(store.token_lists())
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                index.save(f)

        atomic_write(index_path, write)
        logger.info("built the TF-IDF index over %d sequences in %.1fs", N, time.perf_counter() - t0)
    if index.num_docs != N:
        raise ValueError(f"{index_path} indexes {index.num_docs} sequences, the corpus has {N}: delete it to rebuild")
    values, idx = index.top_k([list(map(int, ex["input_ids"])) for ex in examples], k)
    union = np.unique(idx)
    pos = np.searchsorted(union, idx)
    mask = np.zeros((Q, len(union)), dtype=bool)
    tfidf = np.full((Q, len(union)), np.nan)
    rows = np.arange(Q)[:, None]
    mask[rows, pos] = True
    tfidf[rows, pos] = values
    return union, tfidf, mask


def run_score(config: RunConfig, *, overwrite: bool = False) -> RunDir:
    """Score the queries of ``config.score`` against the run's corpus and write the tables."""
    if config.score is None:
        raise InputError("no score settings: give --queries")
    s = config.score
    rd = RunDir(config.run_dir)
    if not (rd.finished("fit") and (rd / layout.FACTORS_DIR / layout.MANIFEST_FILE).is_file()):
        raise InputError(f"{rd.path} has no fitted factors; run `lminfluence fit` first")
    if s.rescore_top is not None and s.rescore_top < s.top:
        raise InputError(f"--rescore-top ({s.rescore_top}) must be at least --top ({s.top}): the shown sequences come from the re-scored ones")
    queries = read_queries(s.queries)  # before the model: cheap checks first
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)
    store = SequenceStore.load(rd.path)
    factors = load_run_factors(rd, model, store)
    examples = query_examples(tokenizer, queries, model)
    # everything the results depend on: a finished run with this key is up to date, partial chunks with it are reused
    key = _digest(s.to_dict(), factors.fingerprint, store.digest(), [list(map(int, e["input_ids"])) for e in examples], [list(map(int, e["labels"])) for e in examples])
    if not overwrite and (rd.manifest().get("score") or {}).get("key") == key and (rd / layout.QUERIES_TABLE).is_file():
        logger.info("the scores in %s are up to date; pass --overwrite to recompute them", rd / layout.SCORES_DIR)
        return rd
    rd.prepare("score", config, overwrite=overwrite)

    task = CausalLMTask()
    t0 = time.perf_counter()
    union, tfidf, mask = candidates(rd, store, examples, s.candidates)
    partial = Partial(rd / layout.PARTIAL_DIR, key)
    first = scan(model, factors, examples, store, union, mask, s, partial, task)
    _, shown = refine(model, factors, examples, store, union, first, s, partial, task)
    logp = log_probs(model, examples, task, s.query_batch_size)
    from .tables import write_tables

    write_tables(rd.path, queries, logp, first, shown, tfidf, union, store, tokenizer, s.save_matrix)
    seconds = time.perf_counter() - t0
    dampings = _dampings(factors, s)
    rd.update_manifest(
        score={
            "queries": len(queries),
            "query_rank": s.rank,
            "candidates": s.candidates,
            "rescore_top": s.rescore_top,
            "top": s.top,
            "damping": {"mean": float(np.mean(dampings)), "min": float(np.min(dampings)), "max": float(np.max(dampings))},
            "key": key,
            "seconds": round(seconds, 2),
            "finished": now(),
        }
    )
    for f in sorted((rd / layout.PARTIAL_DIR).glob("*")):
        f.unlink()
    (rd / layout.PARTIAL_DIR).rmdir()
    logger.info("scored %d queries against %d sequences in %.1fs", len(queries), len(union), seconds)
    return rd


def _dampings(factors, s) -> list[float]:
    cfg = _score_config(s, s.rank)
    if factors.strategy == "identity":
        return [0.0]
    return [cfg.damping_for(factors.curvature.mean_eigenvalue(n)) for n in factors.layers]


__all__ = ["run_score", "scan", "refine", "candidates", "log_probs", "query_examples"]
