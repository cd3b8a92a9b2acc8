"""The fit stage: corpus → training sequences (with provenance) → curvature factors, in a run directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..config import FactorConfig
from ..corpus.readers import InputError, read_documents
from ..corpus.sequences import SequenceStore
from ..curvature.fit import Factors, fit_factors
from ..hooks.modules import resolve_modules
from ..storage import layout
from ..storage.factors import load_factors
from ..task.causal_lm import CausalLMTask
from .config import RunConfig, ScoreSection
from .model import check_pairing, load_model, load_tokenizer
from .rundir import RunDir, now, versions

logger = logging.getLogger(__name__)


def factor_config(config: RunConfig) -> FactorConfig:
    f = config.fit
    try:
        return FactorConfig(
            strategy=f.strategy,
            fisher=f.fisher,
            modules=f.modules,
            seed=f.seed,
            lissa_scale=f.lissa_scale,
            lissa_depth=f.lissa_depth,
            lissa_repeats=f.lissa_repeats,
            lissa_batch_size=f.lissa_batch_size,
        )
    except ValueError as e:
        raise InputError(f"fit: {e}") from e


def load_run_factors(rd: RunDir, model, store: SequenceStore) -> Factors:
    """The run's factors, verified against the model; LiSSA gets its training data back."""
    factors = load_factors(rd / layout.FACTORS_DIR, model)
    if factors.strategy == "lissa":
        from ..curvature.lissa import attach_data

        attach_data(factors, store)
    return factors


def check_modules(model, patterns) -> dict:
    try:
        return resolve_modules(model, patterns)
    except (ValueError, KeyError) as e:
        raise InputError(f"fit.modules: {e}") from e


def run_fit(config: RunConfig, *, overwrite: bool = False, progress: bool = True) -> tuple[RunDir, Factors]:
    """Tokenize the corpus and fit the factors; a finished stage is reused, not redone.

    Every input is checked before the run directory is touched.
    """
    rd = RunDir(config.run_dir)
    if not Path(config.corpus.path).exists():
        raise InputError(f"corpus {config.corpus.path} does not exist")
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)
    check_pairing(model, tokenizer, config.corpus.max_length)
    factor_config(config)  # validates the combination before anything is written
    modules = check_modules(model, config.fit.modules)
    saved = rd.saved_config()
    same_corpus = (
        saved is not None
        and all(saved.get(k) == v for k, v in config.to_dict().items() if k in ("model", "corpus"))
        and SequenceStore.exists(rd.path)
    )
    documents = None if same_corpus else read_documents(config.corpus.path, text_field=config.corpus.text_field, id_field=config.corpus.id_field)
    if config.score is None and saved is not None and saved.get("score") and not overwrite:
        config = RunConfig(config.run_dir, config.model, config.corpus, config.fit, ScoreSection.from_dict(saved["score"], "saved score"))
    rd.prepare("fit", config, overwrite=overwrite)

    if documents is not None or not SequenceStore.exists(rd.path):
        if documents is None:
            documents = read_documents(config.corpus.path, text_field=config.corpus.text_field, id_field=config.corpus.id_field)
        t0 = time.perf_counter()
        store = SequenceStore.build(documents, tokenizer, config.corpus.max_length, progress=progress)
        store.save(rd.path)
        logger.info("tokenized %d documents into %d sequences (%d tokens) in %.1fs", len(documents), len(store), int(store.offsets[-1]), time.perf_counter() - t0)
        rd.update_manifest(
            versions=versions(),
            corpus={
                "path": config.corpus.path,
                "digest": store.digest(),
                "num_documents": len(documents),
                "num_sequences": len(store),
                "num_tokens": int(store.offsets[-1]),
                "max_length": config.corpus.max_length,
            },
        )
    else:
        store = SequenceStore.load(rd.path)
        logger.info("reusing the tokenized corpus in %s (%d sequences)", rd / layout.CORPUS_DIR, len(store))

    factors_dir = rd / layout.FACTORS_DIR
    if rd.finished("fit") and (factors_dir / layout.MANIFEST_FILE).is_file():
        logger.info("reusing the factors in %s", factors_dir)
        return rd, load_run_factors(rd, model, store)
    t0 = time.perf_counter()
    factors = fit_factors(
        model,
        store,
        factor_config(config),
        task=CausalLMTask(),
        batch_size=config.fit.batch_size,
        output_dir=factors_dir,
        cache_gib=config.fit.cache_gib,
    )
    seconds = time.perf_counter() - t0
    logger.info("fitted %s factors on %d layers in %.1fs", factors.strategy, len(modules), seconds)
    rd.update_manifest(
        model={
            "path": config.model.path,
            "gguf_file": config.model.gguf_file,
            "fingerprint": factors.fingerprint,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        },
        fit={"strategy": factors.strategy, "layers": len(factors.layers), "train_size": factors.num_sequences, "seconds": round(seconds, 2), "finished": now()},
    )
    return rd, factors


__all__ = ["run_fit", "factor_config", "check_modules", "load_run_factors"]
