"""The fit stage: corpus → training sequences (with provenance) → curvature factors, in a run directory.

``prepare_fit`` checks every input and decides whether a finished fit can be
reused, writing nothing; ``execute_fit`` tokenizes and fits into the staging
area and commits both outputs at once. ``run_fit`` does both under the run
directory's lock.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import distributed as dist
from ..config import Execution
from ..corpus.readers import read_documents
from ..corpus.sequences import SequenceStore
from ..curvature.factors import Factors, load_factors
from ..errors import InputError, StaleError
from ..fingerprint import model_fingerprint, tokenizer_fingerprint
from ..fitting import fit_factors
from ..hooks.modules import resolve_modules
from ..storage import layout
from ..task.causal_lm import CausalLMTask
from .config import RunConfig
from .model import check_pairing, load_model, load_tokenizer
from .rundir import RunDir, digest, file_stamp, versions

logger = logging.getLogger(__name__)


@dataclass
class FitPlan:
    """A checked fit: its inputs loaded, its identity computed, and whether a finished one is reused."""

    config: RunConfig
    rd: RunDir
    tokenizer: Any
    model: nn.Module
    modules: dict[str, nn.Module]
    key: str
    fingerprints: dict[str, str]
    reuse: bool
    store: SequenceStore | None = None  # tokenized already (None: reused, or resumed from the staging area)
    num_documents: int = 0
    execution: Execution | None = None  # the fit section's, with the sizes it leaves automatic chosen (None: not planned yet)


def _section_key(config: RunConfig) -> dict[str, Any]:
    """What the fit's results depend on among the settings (execution settings change nothing)."""
    return {"model": config.model.to_dict(), "corpus": config.corpus.to_dict(), "fit": config.fit.factors.to_dict()}


def prepare_fit(config: RunConfig, *, overwrite: bool = False, replace_changed: bool = False) -> FitPlan:
    """Check every input of a fit and compare it with what the run directory holds; nothing is written.

    A finished fit of the same run is reused. One of another run is refused, unless
    ``overwrite`` (always recompute) or ``replace_changed`` (recompute only what changed).
    """
    rd = RunDir(config.run_dir)
    rd.check_usable(overwrite=overwrite)
    if not Path(config.corpus.path).exists():
        raise InputError(f"corpus {config.corpus.path} does not exist")
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)
    check_pairing(model, tokenizer, config.corpus.max_length)
    try:
        modules = resolve_modules(model, config.fit.factors.modules)
    except ValueError as e:
        raise InputError(f"fit.modules: {e}") from e
    fingerprints = {
        "model": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "corpus": file_stamp(config.corpus.path),
    }
    key = digest(_section_key(config), fingerprints)
    finished = rd.finished("fit") if rd.is_run() else None
    reuse = False
    if finished is not None and not overwrite:
        if finished.get("key") == key and (rd / layout.FACTORS_DIR / layout.MANIFEST_FILE).is_file():
            reuse = True
        elif not replace_changed:
            recorded = finished.get("inputs") or {}
            diffs = rd.differences("fit", config)
            diffs += [f"{name} changed on disk" if name == "corpus" else f"{name} changed" for name, fp in fingerprints.items() if recorded.get(name) != fp]
            raise InputError(
                f"{rd.path} already holds a different run ({'; '.join(diffs[:4]) or 'other inputs'}); "
                "choose another --run-dir, or pass --overwrite to replace its results"
            )
    # under torchrun rank 0 decides for all (before any rank writes, so all see the same directory)
    reuse, staged = dist.broadcast_object((reuse, not reuse and _staged_corpus(rd, key)) if dist.is_main() else None)
    plan = FitPlan(config, rd, tokenizer, model, modules, key, fingerprints, reuse)
    if not reuse and not staged:  # read and cut the corpus now: its errors come before any write
        plan.store, plan.num_documents = _tokenize(config, tokenizer)
        plan.execution = _planned_execution(config, model, plan.store)
    return plan


def _planned_execution(config: RunConfig, model: nn.Module, store: SequenceStore) -> Execution:
    """The fit's execution settings with automatic sizes chosen now, so that a budget too small is refused before any write."""
    execution = config.fit.execution
    if execution.batch_size is not None and execution.memory_gib is None:
        return execution
    from ..memory import plan_for_data

    share = dist.Slice(store, *dist.span(len(store))) if dist.active() else store  # under torchrun: this rank's sequences
    plan = plan_for_data(model, config.fit.factors, execution, share, task=CausalLMTask(), stages=("fit",))
    logger.info("fit plan:\n%s", plan.report())
    return plan.execution(execution, stage="fit")


def _staged_corpus(rd: RunDir, key: str) -> bool:
    """True when an interrupted run of this very fit left its tokenized corpus in the staging area."""
    root = rd / layout.STAGING_DIR / "fit"
    try:
        return json.loads((root / "key.json").read_text()).get("key") == key and SequenceStore.exists(root)
    except (OSError, ValueError, AttributeError):
        return False


def load_run_factors(rd: RunDir, model: nn.Module, *, lazy: bool = False) -> Factors:
    """The run's factors, verified against the model (StaleError when the model changed since the fit).

    ``lazy``: leave them in the file and read a layer's when it is used (scoring uses each once
    per query group; indexing uses them every batch, so it loads them).
    """
    try:
        return load_factors(rd / layout.FACTORS_DIR, model, lazy=lazy)
    except StaleError as e:
        raise StaleError(f"{e} (the model changed since `lminfluence fit`: fit again with --overwrite)") from e


def _tokenize(config: RunConfig, tokenizer: Any) -> tuple[SequenceStore, int]:
    """The corpus read and cut into sequences (in memory)."""
    c = config.corpus
    documents = read_documents(c.path, text_field=c.text_field, id_field=c.id_field)
    t0 = time.perf_counter()
    store = SequenceStore.build(documents, tokenizer, c.max_length)
    logger.info("tokenized %d documents into %d sequences (%d tokens) in %.1fs", len(documents), len(store), int(store.offsets[-1]), time.perf_counter() - t0)
    return store, len(documents)


def execute_fit(plan: FitPlan, *, progress: bool = True) -> Factors:
    """Tokenize and fit into the staging area, then commit corpus and factors together (call under ``rd.lock()``).

    Under torch.distributed every rank fits its share of the sequences; rank 0 alone writes.
    """
    rd, config = plan.rd, plan.config
    if plan.reuse:
        logger.info("reusing the tokenized corpus and the factors in %s", rd.path)
        return load_run_factors(rd, plan.model)
    root = rd / layout.STAGING_DIR / "fit"
    with dist.checked():
        if dist.is_main():
            rd.staging("fit", plan.key)
            if plan.store is not None:
                plan.store.save(root)
    with dist.checked():  # every rank holds the corpus before rank 0 may commit (and move) it
        if plan.store is None:
            store = SequenceStore.load(root)
            num_documents = len(set(store.doc_id))
            logger.info("resuming: the corpus was tokenized already (%d sequences)", len(store))
        else:
            store, num_documents = plan.store, plan.num_documents
    t0 = time.perf_counter()
    execution = plan.execution or config.fit.execution
    # every rank checkpoints its shard there; rank 0 alone writes the factors
    factors = fit_factors(plan.model, store, config.fit.factors, task=CausalLMTask(), execution=execution, output_dir=root / layout.FACTORS_DIR)
    seconds = time.perf_counter() - t0
    logger.info("fitted %s factors on %d layers in %.1fs", factors.strategy, len(plan.modules), seconds)
    with dist.checked():
        if dist.is_main():
            _commit(plan, factors, store, num_documents, seconds)
    return factors


def _commit(plan: FitPlan, factors: Factors, store: SequenceStore, num_documents: int, seconds: float) -> None:
    """Move the staged corpus and factors into place and record the fit in run.json and config.yaml."""
    rd, config = plan.rd, plan.config
    rd.commit(
        "fit",
        RunConfig(config.run_dir, config.model, config.corpus, config.fit, None),
        {"key": plan.key, "inputs": plan.fingerprints, "sections": {k: v for k, v in config.to_dict().items() if k in ("model", "corpus", "fit")},
         "strategy": factors.strategy, "layers": len(factors.layers),
         "train_size": factors.num_sequences, "seconds": round(seconds, 2)},  # fmt: skip
        versions=versions(),
        model={
            "path": config.model.path,
            "gguf_file": config.model.gguf_file,
            "fingerprint": factors.fingerprint,
            "num_parameters": sum(p.numel() for p in plan.model.parameters()),
        },
        tokenizer={"fingerprint": plan.fingerprints["tokenizer"]},
        corpus={
            "path": config.corpus.path,
            "digest": store.digest(),
            "num_documents": num_documents,
            "num_sequences": len(store),
            "num_tokens": int(store.offsets[-1]),
            "max_length": config.corpus.max_length,
        },
    )


def run_fit(config: RunConfig, *, overwrite: bool = False, progress: bool = True) -> tuple[RunDir, Factors]:
    """Tokenize the corpus and fit the factors; a finished fit of the same run is reused, not redone."""
    plan = prepare_fit(config, overwrite=overwrite)
    with plan.rd.lock():
        return plan.rd, execute_fit(plan, progress=progress)


__all__ = ["FitPlan", "prepare_fit", "execute_fit", "run_fit", "load_run_factors"]
