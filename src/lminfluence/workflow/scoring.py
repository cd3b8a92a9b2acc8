"""The score stage: the library's two-stage procedure (``scoring/two_stage.py``) over a run directory.

``prepare_score`` checks every input (queries, the model and tokenizer against
the fit, the tokenized corpus, the factors) and decides whether the finished
scores are up to date, writing nothing. ``execute_score`` runs the procedure
with its chunks kept on disk (an interrupted run resumes), writes the tables
into the staging area and commits them; earlier scores stay in place until then.
With ``score.index`` the run's gradient index ranks the sequences instead of a
model pass over them (``two_stage_with_index``); the re-scored top and the
shown sequences' details still come from the model.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..corpus.readers import Query, read_queries
from ..corpus.sequences import SequenceStore
from ..curvature.factors import Factors
from ..errors import InputError, StaleError
from ..filtering.tfidf import TfidfIndex
from ..fingerprint import tokenizer_fingerprint
from ..index import GradientIndex, two_stage_with_index
from ..passes import collate_to, model_device
from ..scoring.pairwise import layer_dampings
from ..scoring.two_stage import TwoStageResult, two_stage_scores
from ..storage import layout
from ..storage.atomic import atomic_write, atomic_write_npz
from ..task.causal_lm import CausalLMTask, examples_from_pairs
from .config import RunConfig
from .fitting import load_run_factors
from .model import context_length, load_model, load_tokenizer
from .rundir import RunDir, digest

logger = logging.getLogger(__name__)


class DiskStore:
    """A ChunkStore of .npz files in one folder (atomic writes: a file that exists is complete)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.root / f"{name}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            logger.warning("ignoring the damaged chunk %s (%s); it is computed again", path, e)
            return None

    def put(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        atomic_write_npz(self.root / f"{name}.npz", **arrays)


def query_examples(tokenizer: Any, queries: Sequence[Query], model: nn.Module) -> list[dict]:
    """The queries tokenized (prompt with special tokens, completion without), checked against the model's context."""
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


@torch.no_grad()
def log_probs(model: nn.Module, examples: Sequence[dict], task: CausalLMTask, batch_size: int) -> np.ndarray:
    """Log p(completion | prompt) of each query under the model (the measurement f)."""
    device = model_device(model)
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_to(task, examples[i : i + batch_size], device)
        out.append(task.measurement(task.forward(model, batch), batch).double().cpu())
    return torch.cat(out).numpy()


@dataclass
class QueryPlan:
    """The queries of a score stage, read and tokenized (checked before anything else runs)."""

    queries: list[Query]
    examples: list[dict]


def prepare_queries(config: RunConfig, tokenizer: Any, model: nn.Module) -> QueryPlan:
    """The score section's queries read and tokenized (errors before anything else runs)."""
    if config.score is None:
        raise InputError("no score settings: give --queries")
    queries = read_queries(config.score.files.queries)
    return QueryPlan(queries, query_examples(tokenizer, queries, model))


@dataclass
class ScorePlan:
    """A checked score stage: inputs loaded and verified against the fit, its identity, and whether it is up to date."""

    config: RunConfig
    rd: RunDir
    model: nn.Module
    tokenizer: Any
    store: SequenceStore
    factors: Factors
    queries: QueryPlan
    index: TfidfIndex | None
    key: str
    up_to_date: bool
    gradient_index: GradientIndex | None = None  # score.index: the run's gradient index ranks the sequences


def _load_index(rd: RunDir, store: SequenceStore, candidates: int | None) -> TfidfIndex | None:
    """The saved TF-IDF index when candidates are asked for; None when it must be (re)built."""
    path = rd / layout.TFIDF_FILE
    if candidates is None or candidates >= len(store) or not path.is_file():
        return None
    try:
        index = TfidfIndex.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logger.warning("the TF-IDF index %s cannot be read (%s): it is built again", path, e)
        return None
    if index.num_docs != len(store):
        logger.warning("the TF-IDF index %s covers %d sequences, the corpus %d: it is built again", path, index.num_docs, len(store))
        return None
    return index


def _save_index(index: TfidfIndex, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append .npz to a bare name
            index.save(f)

    atomic_write(path, write)


def _check_against_fit(rd: RunDir, tokenizer: Any, store: SequenceStore, factors: Factors) -> None:
    """The tokenizer, the tokenized corpus and the factors must be those the fit made (StaleError otherwise)."""
    manifest = rd.manifest()
    fit = manifest.get("fit") or {}
    if tokenizer_fingerprint(tokenizer) != (fit.get("inputs") or {}).get("tokenizer"):
        raise StaleError("the tokenizer changed since `lminfluence fit`: the corpus was tokenized by another one; fit again with --overwrite")
    if store.digest() != (manifest.get("corpus") or {}).get("digest"):
        raise StaleError(f"{rd / layout.CORPUS_DIR} is not the corpus this run was fitted on (its digest differs); fit again with --overwrite")
    if factors.num_sequences != len(store):
        raise StaleError(f"the factors were fitted on {factors.num_sequences} sequences but the corpus has {len(store)}; fit again with --overwrite")


def _score_key(config: RunConfig, rd: RunDir, examples: list[dict], gradient_index: GradientIndex | None = None) -> str:
    from .indexing import manifest_digest

    s = config.score
    assert s is not None
    settings: dict[str, Any] = {"scoring": s.scoring.to_dict(), "stages": s.stages.to_dict(), "save_matrix": s.files.save_matrix}
    if gradient_index is not None:  # scores ranked by an index depend on it; a rebuilt index makes them out of date
        settings["index"] = manifest_digest(gradient_index)
    return digest(
        settings,
        (rd.finished("fit") or {}).get("key"),
        [list(map(int, e["input_ids"])) for e in examples],
        [list(map(int, e["labels"])) for e in examples],
    )


def prepare_score(
    config: RunConfig,
    *,
    overwrite: bool = False,
    replace_changed: bool = False,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    queries: QueryPlan | None = None,
) -> ScorePlan:
    """Check every input of the score stage against the finished fit; nothing is written.

    Up-to-date scores are kept; scores of another configuration are refused unless
    ``overwrite`` (always recompute) or ``replace_changed``.
    """
    rd = RunDir(config.run_dir)
    if not (rd.finished("fit") and (rd / layout.FACTORS_DIR / layout.MANIFEST_FILE).is_file()):
        raise InputError(f"{rd.path} has no fitted factors; run `lminfluence fit` first")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    model = model if model is not None else load_model(config.model)
    queries = queries or prepare_queries(config, tokenizer, model)
    store = SequenceStore.load(rd.path)
    factors = load_run_factors(rd, model, lazy=True)  # only the queries' preconditioning reads them: no copy held during the scan
    _check_against_fit(rd, tokenizer, store, factors)
    s = config.score
    assert s is not None
    gradient_index = None
    if s.files.index:
        from .indexing import open_run_index

        gradient_index = open_run_index(rd, factors, store)
    key = _score_key(config, rd, queries.examples, gradient_index)
    finished = rd.finished("score")
    up_to_date = finished is not None and finished.get("key") == key and (rd / layout.QUERIES_TABLE).is_file() and not overwrite
    if finished is not None and not up_to_date and not (overwrite or replace_changed):
        diffs = rd.differences("score", config) or ["other queries"]
        raise InputError(
            f"{rd.path} already holds scores of a different run ({'; '.join(diffs[:4])}); "
            "pass --overwrite to replace them (they stay until the new ones are complete)"
        )
    index = _load_index(rd, store, s.stages.candidates)
    up_to_date = dist.broadcast_object(up_to_date)  # rank 0 decides for all (torchrun)
    return ScorePlan(config, rd, model, tokenizer, store, factors, queries, index, key, up_to_date, gradient_index)


def execute_score(plan: ScorePlan) -> None:
    """Run the two-stage procedure with its chunks on disk, write the tables, commit (call under ``rd.lock()``).

    Under torch.distributed every rank runs it (each computing and saving its share of the
    chunks in the shared staging folder); rank 0 alone writes the tables and commits.
    """
    rd, s = plan.rd, plan.config.score
    assert s is not None
    if plan.up_to_date:
        logger.info("the scores in %s are up to date; pass --overwrite to recompute them", rd / layout.SCORES_DIR)
        return
    root = rd / layout.STAGING_DIR / "score"
    with dist.checked():
        if dist.is_main():
            rd.staging("score", plan.key)
    task = CausalLMTask()
    t0 = time.perf_counter()
    index = plan.index
    if s.stages.candidates is not None and s.stages.candidates < len(plan.store) and index is None:
        index = TfidfIndex.build(plan.store.token_lists())
        if dist.is_main():
            _save_index(index, rd / layout.TFIDF_FILE)
        logger.info("built the TF-IDF index over %d sequences in %.1fs", len(plan.store), time.perf_counter() - t0)
    if plan.gradient_index is not None:
        result = two_stage_with_index(
            plan.model, plan.factors, plan.gradient_index, plan.queries.examples, plan.store, s.scoring, s.stages,
            task=task, execution=s.execution, store=DiskStore(root / "partial"), tfidf=index, chunk_size=s.files.chunk_size,
        )  # fmt: skip
    else:
        result = two_stage_scores(
            plan.model, plan.factors, plan.queries.examples, plan.store, s.scoring, s.stages,
            task=task, execution=s.execution, store=DiskStore(root / "partial"), index=index, chunk_size=s.files.chunk_size,
        )  # fmt: skip
    with dist.checked():  # rank 0 writes the tables and commits; the others wait for its outcome
        if dist.is_main():
            _write_and_commit(plan, result, root, task, t0)


def _write_and_commit(plan: ScorePlan, result: TwoStageResult, root: Path, task: CausalLMTask, t0: float) -> None:
    """The score tables into the staging folder, then the stage committed."""
    from .tables import write_tables

    s = plan.config.score
    assert s is not None
    logp = log_probs(plan.model, plan.queries.examples, task, s.execution.query_batch_size or len(plan.queries.examples))
    shown = _as_columns(result)
    write_tables(root, plan.queries.queries, logp, result.first, shown, result.tfidf, result.columns, plan.store, plan.tokenizer, s.files.save_matrix)
    seconds = time.perf_counter() - t0
    dampings = list(layer_dampings(plan.factors, s.scoring).values())
    entry = {
        "key": plan.key,
        "queries": len(plan.queries.queries),
        "query_rank": s.scoring.query_rank,
        "candidates": s.stages.candidates,
        "rescore_top": s.stages.rescore_top,
        "top": s.stages.top,
        "index": s.files.index,
        "damping": {"mean": float(np.mean(dampings)), "min": float(np.min(dampings)), "max": float(np.max(dampings))},
        "seconds": round(seconds, 2),
    }
    plan.rd.commit("score", plan.config, entry)
    logger.info("scored %d queries against %d sequences in %.1fs", len(plan.queries.queries), len(result.columns), seconds)


def _as_columns(result: TwoStageResult) -> list:
    """The shown sequences with ``indices`` as columns of the scored union (what the tables' writer takes)."""
    return [replace(sh, indices=np.searchsorted(result.columns, sh.indices)) for sh in result.shown]


def run_score(config: RunConfig, *, overwrite: bool = False) -> RunDir:
    """Score the queries of ``config.score`` against the run's corpus and write the tables."""
    plan = prepare_score(config, overwrite=overwrite)
    with plan.rd.lock():
        execute_score(plan)
    return plan.rd


__all__ = ["run_score", "prepare_score", "execute_score", "prepare_queries", "ScorePlan", "QueryPlan", "DiskStore", "query_examples", "log_probs"]
