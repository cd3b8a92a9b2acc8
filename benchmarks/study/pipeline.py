"""One model's study, as the paper runs it: factors fitted on a sample, TF-IDF candidates scored, then analysed.

Steps, each cached in the run directory and skipped when its inputs are unchanged:

1. corpus: the documents cut into training sequences of ``length`` tokens
   (``SequenceStore.build``) → ``RUN/corpus/``;
2. pool: each query's ``candidates`` best sequences by TF-IDF over the model's
   token ids (docs/method.md §6) plus ``background`` sequences drawn at
   random; every query is scored against the whole pool (so the cross-lingual
   comparisons see the same sequences for every query, and the power-law fit
   sees the bulk of the distribution, not only the candidates' top);
3. fit: EK-FAC factors on ``fit`` sequences drawn at random from the corpus
   → ``RUN/factors/`` (checkpointed: an interrupted fit resumes);
4. score: the pool scanned at rank ``rank`` (query batching), the ``top``
   most positive and negative sequences of each query with per-layer and
   per-token scores (``two_stage_scores``; finished chunks kept in
   ``RUN/staging/``) → ``RUN/scores/`` (the CLI's tables, ``write_tables``);
5. analyze: ``analyze_run`` → ``RUN/analysis/``, and the word-order pairs
   (``score_word_order``) → ``analysis/word_order.parquet``;
6. report: ``RUN/run.json`` and ``config.yaml`` describing the study, then the
   HTML report.

The CLI's ``fit`` stage fits on every sequence of its corpus; fitting on a
sample of a larger scored corpus, as the paper does, is done here through the
Python API and the library's own table writers, so ``lminfluence analyze`` and
``lminfluence report`` work on the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import lminfluence as li
from lminfluence.analysis import analyze_run, table_path
from lminfluence.analysis.files import write_table
from lminfluence.analysis.tables import SCHEMAS
from lminfluence.analysis.word_order import as_pairs, score_word_order
from lminfluence.corpus.readers import Document, Query
from lminfluence.corpus.sequences import SequenceStore
from lminfluence.curvature.factors import load_factors
from lminfluence.filtering.tfidf import TfidfIndex
from lminfluence.scoring.two_stage import TwoStageConfig, token_ids, two_stage_scores
from lminfluence.task.causal_lm import CausalLMTask
from lminfluence.workflow.scoring import DiskStore, log_probs, query_examples
from lminfluence.workflow.tables import write_tables

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizes:
    """How big each step is (docs/analyses.md compares them with the paper's)."""

    length: int = 128  # tokens per training sequence
    fit: int = 64  # sequences the factors are fitted on
    candidates: int = 12  # TF-IDF candidates per query
    background: int = 256  # random sequences every query also scores
    rank: int = 32  # rank of the scan's query batching
    top: int = 5  # sequences shown per end of each query's list (per-layer and per-token scores)
    seed: int = 0


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Log:
    """Per-step seconds and notes, kept in RUN/study.json (a rerun keeps the times of the steps it skips)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "study.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("steps", {})

    def step(self, name: str, key: str) -> bool:
        """True when ``name`` finished before with the same key (then it is skipped)."""
        return self.data["steps"].get(name, {}).get("key") == key

    def done(self, name: str, key: str, seconds: float, **notes: Any) -> None:
        self.data["steps"][name] = {"key": key, "seconds": round(seconds, 1), "load": [round(x, 2) for x in os.getloadavg()], **notes}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def build_corpus(run_dir: Path, documents: Sequence[Document], tokenizer: Any, sizes: Sizes, log: Log) -> SequenceStore:
    key = digest([(d.id, d.text) for d in documents], sizes.length, type(tokenizer).__name__, len(tokenizer))
    if log.step("corpus", key) and SequenceStore.exists(run_dir):
        return SequenceStore.load(run_dir)
    t0 = time.perf_counter()
    store = SequenceStore.build(list(documents), tokenizer, sizes.length, progress=False)
    store.save(run_dir)
    log.done("corpus", key, time.perf_counter() - t0, documents=len(documents), sequences=len(store), tokens=int(store.num_tokens.sum()))
    return store


def select_pool(store: SequenceStore, examples: Sequence[dict], sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    """(pool [P] sorted corpus indices, TF-IDF scores [Q, P]): each query's top candidates plus a random background."""
    index = TfidfIndex.build(store.token_lists())
    tfidf = index.scores([token_ids(ex) for ex in examples])  # [Q, N]
    cand = np.argsort(-tfidf, axis=1, kind="stable")[:, : sizes.candidates]
    rng = np.random.default_rng(sizes.seed)
    rest = np.setdiff1d(np.arange(len(store)), cand.ravel())
    background = rng.choice(rest, size=min(sizes.background, rest.size), replace=False)
    pool = np.union1d(cand.ravel(), background)
    return pool, tfidf[:, pool]


def fit(run_dir: Path, model, store: SequenceStore, sizes: Sizes, execution: li.Execution, log: Log) -> li.Factors:
    """EK-FAC on ``sizes.fit`` sequences drawn at random from the corpus (resumed from its checkpoint when interrupted)."""
    sample = np.sort(np.random.default_rng(sizes.seed + 1).choice(len(store), size=min(sizes.fit, len(store)), replace=False))
    key = digest(store.digest(), sample.tolist(), li.FactorConfig().to_dict())
    out = run_dir / "factors"
    if log.step("fit", key) and (out / "manifest.json").is_file():
        return load_factors(out, model)
    t0 = time.perf_counter()
    factors = li.fit_factors(model, store.subset(sample), li.FactorConfig(), execution=execution, output_dir=out)
    log.done("fit", key, time.perf_counter() - t0, sequences=len(sample), tokens=int(store.num_tokens[sample].sum()), meta=factors.meta)
    return factors


def score(run_dir: Path, model, tokenizer, factors, store, queries: list[Query], examples, pool, tfidf, sizes, execution, log: Log) -> None:
    key = digest(store.digest(), log.data["steps"]["fit"]["key"], [asdict(q) for q in queries], pool.tolist(), sizes.rank, sizes.top)
    if log.step("score", key) and (run_dir / "scores" / "queries.parquet").is_file():
        return
    t0 = time.perf_counter()
    result = two_stage_scores(
        model, factors, examples, store.subset(pool), li.ScoreConfig(query_rank=sizes.rank), TwoStageConfig(top=sizes.top),
        execution=execution, store=DiskStore(run_dir / "staging" / f"partial-{key}"), chunk_size=64,
    )  # fmt: skip
    if not np.array_equal(result.columns, np.arange(len(pool))):
        raise RuntimeError("two_stage_scores did not score the whole pool")
    logp = log_probs(model, examples, CausalLMTask(), 4)
    write_tables(run_dir, queries, logp, result.first, result.shown, tfidf, pool, store, tokenizer, save_matrix=True)
    log.done("score", key, time.perf_counter() - t0, pool=len(pool), queries=len(queries), tokens=int(store.num_tokens[pool].sum()))


def analyze(run_dir: Path, model, tokenizer, factors, queries: list[Query], pairs: list[dict], sizes: Sizes, execution, log: Log) -> None:
    t0 = time.perf_counter()
    analyze_run(run_dir, k=sizes.top)
    if pairs:
        cols = score_word_order(model, tokenizer, factors, queries, as_pairs(run_dir / "pairs.jsonl"), max_length=sizes.length, execution=execution)
        write_table(table_path(run_dir, "word_order"), cols, SCHEMAS["word_order"])
    log.done("analyze", "always", time.perf_counter() - t0, pairs=len(pairs))


def describe(run_dir: Path, name: str, gguf: Path, model, store: SequenceStore, factors, pool, queries, sizes: Sizes, log: Log) -> None:
    """run.json and config.yaml in the shape the CLI writes, so that the report's header describes the study."""
    from lminfluence.scoring.pairwise import layer_dampings

    damping = np.asarray(list(layer_dampings(factors, li.ScoreConfig()).values()), dtype=np.float64)
    steps = log.data["steps"]
    manifest = {
        "format_version": 2,
        "written_by": "benchmarks/paper_study.py (the study's own pipeline, with the library's writers)",
        "versions": {"lminfluence": li.__version__},
        "model": {"path": str(gguf.parent), "gguf_file": gguf.name, "num_parameters": sum(p.numel() for p in model.parameters())},
        "corpus": {"num_documents": len(set(store.doc_id)), "num_sequences": len(store), "num_tokens": int(store.num_tokens.sum()), "max_length": sizes.length},
        "fit": {"strategy": factors.strategy, "train_size": factors.num_sequences, "seconds": steps["fit"]["seconds"]},
        "score": {"queries": len(queries), "query_rank": sizes.rank, "candidates": f"{sizes.candidates} per query + {sizes.background} random",
                  "top": sizes.top, "pool": len(pool), "seconds": steps["score"]["seconds"],
                  "damping": {"mean": float(damping.mean()), "min": float(damping.min()), "max": float(damping.max())}},
        "study": {"name": name, "sizes": asdict(sizes)},
    }  # fmt: skip
    (run_dir / "run.json").write_text(json.dumps(manifest, indent=1))
    config = {"model": {"path": str(gguf.parent), "gguf_file": gguf.name}, "corpus": {"max_length": sizes.length}, "score": {"damping_scale": 0.1, "query_rank": sizes.rank}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def run_study(
    name: str, run_dir: Path, gguf: Path, model, tokenizer, documents: Sequence[Document], query_rows: list[dict], pairs: list[dict],
    sizes: Sizes, memory_gib: float | None = None, report: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Every step for one model; returns RUN/study.json's content."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = Log(run_dir)
    log.data["sizes"] = asdict(sizes)
    execution = li.Execution(memory_gib=memory_gib)
    fields = ("group", "language")
    queries = [Query(r["id"], r["prompt"], r["completion"], *(r.get(f) for f in fields)) for r in query_rows]
    (run_dir / "queries.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in query_rows), encoding="utf-8")
    if pairs:
        (run_dir / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    examples = query_examples(tokenizer, queries, model)
    store = build_corpus(run_dir, documents, tokenizer, sizes, log)
    pool, tfidf = select_pool(store, examples, sizes)
    factors = fit(run_dir, model, store, sizes, execution, log)
    score(run_dir, model, tokenizer, factors, store, queries, examples, pool, tfidf, sizes, execution, log)
    analyze(run_dir, model, tokenizer, factors, queries, pairs, sizes, execution, log)
    describe(run_dir, name, gguf, model, store, factors, pool, queries, sizes, log)
    if report:
        from lminfluence.report import write_report

        t0 = time.perf_counter()
        write_report(run_dir, top=sizes.top)
        log.done("report", "always", time.perf_counter() - t0)
    log.data["pool"] = {"size": int(len(pool)), "tokens": int(store.num_tokens[pool].sum())}
    log.save()
    return log.data


__all__ = ["Sizes", "run_study", "select_pool", "build_corpus", "Log", "digest"]
