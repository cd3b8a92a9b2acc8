"""The fit stage: corpus → training sequences (with provenance) → curvature factors, in a run directory."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ..config import Execution, FactorConfig
from ..corpus.readers import read_documents
from ..errors import InputError
from ..corpus.sequences import SequenceStore
from ..curvature.factors import Factors, load_factors
from ..curvature.fit import fit_factors
from ..hooks.modules import resolve_modules
from ..storage import layout
from ..task.causal_lm import CausalLMTask
from .config import RunConfig, ScoreSection
from .model import check_pairing, load_model, load_tokenizer
from .rundir import RunDir, file_stamp, now, versions

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
    try:
        factors = load_factors(rd / layout.FACTORS_DIR, model)
    except ValueError as e:
        raise InputError(f"{e} (the model changed since `lminfluence fit`: run it again with --overwrite)") from e
    return factors


def model_stamp(section) -> str:
    """Stamp of the model's files (weights, config, tokenizer), to notice a model replaced in place."""
    path = Path(section.path)
    files = [path / section.gguf_file] if section.gguf_file else [f for f in path.iterdir() if f.is_file()]
    if section.tokenizer:
        files.append(Path(section.tokenizer))
    return file_stamp(*files)


def check_modules(model, patterns) -> dict:
    try:
        return resolve_modules(model, patterns)
    except (ValueError, KeyError) as e:
        raise InputError(f"fit.modules: {e}") from e


def run_fit(config: RunConfig, *, overwrite: bool = False, progress: bool = True) -> tuple[RunDir, Factors]:
    """Tokenize the corpus and fit the factors; a finished stage of the same run is reused, not redone.

    Every input is checked (and the corpus tokenized) before the run directory is touched.
    """
    rd = RunDir(config.run_dir)
    if not Path(config.corpus.path).exists():
        raise InputError(f"corpus {config.corpus.path} does not exist")
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)
    check_pairing(model, tokenizer, config.corpus.max_length)
    factor_config(config)  # validates the combination before anything is written
    modules = check_modules(model, config.fit.modules)
    inputs = {"corpus": file_stamp(config.corpus.path), "model": model_stamp(config.model)}
    saved = rd.saved_config()
    reuse = (
        not overwrite
        and saved is not None
        and all(saved.get(k) == v for k, v in config.to_dict().items() if k in ("model", "corpus"))
        and (rd.manifest().get("inputs") or {}).get("fit") == inputs
        and SequenceStore.exists(rd.path)
    )
    store = None
    if not reuse:
        documents = read_documents(config.corpus.path, text_field=config.corpus.text_field, id_field=config.corpus.id_field)
        t0 = time.perf_counter()
        store = SequenceStore.build(documents, tokenizer, config.corpus.max_length, progress=progress)
        seconds = time.perf_counter() - t0
    # the fit stage saves its own sections; the score section stays what the last scoring used (the score stage checks it)
    kept = ScoreSection.from_dict(saved["score"], "saved score") if saved and saved.get("score") and not overwrite else None
    rd.prepare("fit", RunConfig(config.run_dir, config.model, config.corpus, config.fit, kept), overwrite=overwrite, inputs=inputs)

    if store is not None:
        store.save(rd.path)
        logger.info("tokenized %d documents into %d sequences (%d tokens) in %.1fs", len(documents), len(store), int(store.offsets[-1]), seconds)
        manifest = rd.manifest()
        for stale in ("fit", "score", "report"):  # a new corpus invalidates what was computed on the old one
            manifest.pop(stale, None)
        manifest.update(
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
        rd.write_manifest(manifest)
        for rel in (layout.FACTORS_DIR, layout.SCORES_DIR, layout.REPORT_DIR, layout.TFIDF_FILE):
            target = rd / rel
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
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
        execution=Execution(batch_size=config.fit.batch_size, cache_gib=config.fit.cache_gib),
        output_dir=factors_dir,
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
