"""Build the demo's inputs once: corpus, queries, facts and a trained model, in a work directory.

Layout of ``workdir``::

    corpus.jsonl    {"id", "text"} per document: exactly what the model was trained on
    queries.jsonl   {"id", "prompt", "completion", "kind", "fact_id", "group"}
    facts.json      per fact: id, subject, name, statement, flipped_statement, doc_ids
    model/          a Hugging Face directory: config, model.safetensors, tokenizer
    demo.json       written last: the parameters it was built with, training losses,
                    memorisation of each fact; its presence marks a finished build

A second call with the same parameters returns at once; other parameters
(or a partial build) rebuild everything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..corpus.sequences import SequenceStore
from ..storage.atomic import atomic_write_text
from . import corpus as corpus_mod
from .facts import fact_queries, make_facts
from .model import (
    TrainSettings,
    completion_stats,
    make_model,
    train_model,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

FORMAT = 2  # bump when the build changes what it writes for the same parameters (2: queries carry "group")
MARKER = "demo.json"


@dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo build.

    Attributes:
        n_facts: planted facts.
        docs_per_fact: inclusive range of documents stating each fact.
        pydoc_chars, stdlib_chars: character budgets of the real text.
        vocab_size: BPE vocabulary, EOS included.
        max_length: tokens per training sequence.
        train: the model's shape and training schedule.
    """

    n_facts: int
    docs_per_fact: tuple[int, int]
    pydoc_chars: int
    stdlib_chars: int
    vocab_size: int
    max_length: int
    train: TrainSettings


SCALES: dict[str, DemoScale] = {
    "full": DemoScale(
        n_facts=24,
        docs_per_fact=(3, 5),
        pydoc_chars=120_000,
        stdlib_chars=20_000,
        vocab_size=2048,
        max_length=128,
        # ~390 sequences, 22 epochs of 8-sequence steps: the name is the greedy completion
        # for 96-100% of facts (seeds 0-2) in about 3 minutes on 2 CPU cores (benchmarks/demo_check.py)
        train=TrainSettings(n_layer=4, n_embd=128, n_head=4, epochs=22, batch_size=8, lr=2e-3),
    ),
    "tiny": DemoScale(
        n_facts=3,
        docs_per_fact=(2, 3),
        pydoc_chars=40_000,
        stdlib_chars=4_000,
        vocab_size=512,
        max_length=128,
        train=TrainSettings(n_layer=2, n_embd=32, n_head=2, epochs=1, batch_size=16, lr=3e-3),
    ),
}


@dataclass(frozen=True)
class DemoInputs:
    """Where a finished demo build lies, and how to read it.

    Attributes:
        workdir: the build's directory.
        model_dir: Hugging Face model and tokenizer (``from_pretrained`` loads both).
        corpus_path: JSON Lines, ``{"id", "text"}`` per document.
        queries_path: JSON Lines, ``{"id", "prompt", "completion", "kind", "fact_id"}``;
            kind is ``fact`` (trained order), ``flipped`` or ``open`` (fact_id null).
        facts_path: JSON list of facts with the ids of the documents that state them.
        manifest_path: the build's parameters and training record (``demo.json``).
        max_length: tokens per training sequence: cut each document's token ids into
            consecutive pieces of at most this many (``SequenceStore.build``) to get the
            sequences the model was trained on.
        scale: ``full`` or ``tiny``.
        seed: the build's seed.
    """

    workdir: Path
    model_dir: Path
    corpus_path: Path
    queries_path: Path
    facts_path: Path
    manifest_path: Path
    max_length: int
    scale: str
    seed: int

    def read_corpus(self) -> list[dict]:
        return _read_jsonl(self.corpus_path)

    def read_queries(self) -> list[dict]:
        return _read_jsonl(self.queries_path)

    def read_facts(self) -> list[dict]:
        return json.loads(self.facts_path.read_text(encoding="utf-8"))

    def read_manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _parameters(scale: str, seed: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "scale": scale,
        "seed": seed,
        "sizes": dataclasses.asdict(SCALES[scale]),
        "python": platform.python_version(),  # the pydoc text and stdlib sources come from it
    }


def _inputs(workdir: Path, scale: str, seed: int) -> DemoInputs:
    return DemoInputs(
        workdir=workdir,
        model_dir=workdir / "model",
        corpus_path=workdir / "corpus.jsonl",
        queries_path=workdir / "queries.jsonl",
        facts_path=workdir / "facts.json",
        manifest_path=workdir / MARKER,
        max_length=SCALES[scale].max_length,
        scale=scale,
        seed=seed,
    )


def _is_built(inputs: DemoInputs, parameters: dict[str, Any]) -> bool:
    paths = (inputs.corpus_path, inputs.queries_path, inputs.facts_path, inputs.model_dir / "model.safetensors")
    if not inputs.manifest_path.is_file() or not all(p.exists() for p in paths):
        return False
    try:
        return inputs.read_manifest().get("parameters") == json.loads(json.dumps(parameters))
    except (OSError, ValueError):
        return False


def prepare_demo(
    workdir: str | Path,
    *,
    scale: Literal["full", "tiny"] = "full",
    seed: int = 0,
    progress: bool = True,
) -> DemoInputs:
    """Build (or reuse) the demo's corpus, queries, facts and trained model in ``workdir``.

    The corpus is pydoc reference prose and standard-library source with
    fictional facts planted in one word order; the model is a small GPT-2
    trained from scratch on exactly that corpus, cut into ``max_length``-token
    sequences. ``tiny`` is a seconds-fast build for tests.

    Args:
        workdir: directory for the files (created if missing).
        scale: ``full`` (the demo) or ``tiny``.
        seed: picks the facts, the paragraphs that carry them, the initialisation
            and the order of training.
        progress: show tqdm bars.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {', '.join(map(repr, SCALES))}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    workdir = Path(workdir)
    inputs = _inputs(workdir, scale, seed)
    parameters = _parameters(scale, seed)
    if _is_built(inputs, parameters):
        logger.info("reusing the demo build in %s", workdir)
        return inputs
    workdir.mkdir(parents=True, exist_ok=True)
    inputs.manifest_path.unlink(missing_ok=True)  # the marker goes first, so a half-rebuilt directory is never taken as built
    record = _build(inputs, SCALES[scale], seed, progress)
    atomic_write_text(inputs.manifest_path, json.dumps({"parameters": parameters, **record}, indent=2) + "\n")
    return inputs


def _save_quietly(model: Any, tokenizer: Any, path: Path, progress: bool) -> None:
    """save_pretrained, with transformers' own progress bar off unless ``progress`` (then restored)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build(inputs: DemoInputs, sizes: DemoScale, seed: int, progress: bool) -> dict[str, Any]:
    """Write corpus, queries, facts and model; return the training record for the manifest."""
    started = time.perf_counter()
    topics = corpus_mod.pydoc_topics()
    forbidden = corpus_mod.real_words(topics, corpus_mod.stdlib_documents(sizes.stdlib_chars))
    facts = make_facts(sizes.n_facts, seed, forbidden)
    docs, facts = corpus_mod.build_corpus(
        facts,
        docs_per_fact=sizes.docs_per_fact,
        pydoc_chars=sizes.pydoc_chars,
        stdlib_chars=sizes.stdlib_chars,
        seed=seed,
        max_paragraph_chars=3 * sizes.max_length,
        topics=topics,
    )
    tokenizer = train_tokenizer((d.text for d in docs), sizes.vocab_size)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    docs = corpus_mod.fit_planted(docs, facts, n_tokens, sizes.max_length)
    rows = [{"id": d.id, "text": d.text} for d in docs]
    queries = fact_queries(facts) + corpus_mod.open_queries(docs)
    # exactly the sequences `lminfluence fit` cuts from corpus.jsonl
    sequences = [s.tolist() for s in SequenceStore.build(docs, tokenizer, sizes.max_length, progress=False).token_lists()]
    logger.info("demo corpus: %d documents, %d sequences, %d tokens", len(rows), len(sequences), sum(map(len, sequences)))

    model = make_model(len(tokenizer), sizes.max_length, sizes.train, seed)
    losses = train_model(model, sequences, sizes.train, seed, progress)
    memorised = {}
    for q in queries:
        if q["kind"] != "open":
            memorised[q["id"]] = completion_stats(model, tokenizer, q["prompt"], q["completion"])
    trained = [v for k, v in memorised.items() if k.endswith("-trained")]

    tmp_model = inputs.model_dir.with_name(inputs.model_dir.name + ".tmp")
    shutil.rmtree(tmp_model, ignore_errors=True)
    _save_quietly(model, tokenizer, tmp_model, progress)
    shutil.rmtree(inputs.model_dir, ignore_errors=True)
    os.replace(tmp_model, inputs.model_dir)
    atomic_write_text(inputs.corpus_path, _jsonl(rows))
    atomic_write_text(inputs.queries_path, _jsonl(queries))
    atomic_write_text(inputs.facts_path, json.dumps([f.to_dict() for f in facts], indent=2, ensure_ascii=False) + "\n")
    return {
        "documents": len(rows),
        "sequences": len(sequences),
        "tokens": sum(map(len, sequences)),
        "parameters_count": sum(p.numel() for p in model.parameters()),
        "epoch_losses": losses,
        "facts_greedy": sum(v["greedy"] for v in trained) / max(len(trained), 1),
        "completions": memorised,
        "build_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }


__all__ = ["DemoInputs", "DemoScale", "SCALES", "prepare_demo"]
