"""The index stage: the run's gradient index (docs/index.md) over its tokenized corpus, after ``fit``.

``prepare_index`` checks every input (the finished fit; the model, tokenizer,
corpus and factors against it; the index settings against the factors) and
decides whether the finished index is up to date, writing nothing.
``execute_index`` builds into ``RUN/staging/index/index/``, where a killed
build resumes from its finished shards, and commits it as ``RUN/index/``; an
earlier index stays in place until then. Under torchrun each rank writes its
own shards (the store's cells c with c mod W = rank), rank 0 commits.

``open_run_index`` is what ``score --index`` reads: the committed index,
checked against the run's factors and corpus.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import distributed as dist
from ..corpus.sequences import SequenceStore
from ..curvature.factors import Factors
from ..errors import InputError, StaleError
from ..index import GradientIndex, build_index
from ..index.plan import IndexPlan
from ..index.store import MANIFEST, IndexFiles, remove_temporary_files
from ..storage import layout
from .config import IndexSection, RunConfig
from .fitting import load_run_factors
from .model import load_model, load_tokenizer
from .rundir import RunDir, digest

logger = logging.getLogger(__name__)


@dataclass
class IndexStagePlan:
    """A checked index stage: inputs loaded and verified against the fit, its identity, and whether it is up to date."""

    config: RunConfig
    rd: RunDir
    model: nn.Module
    store: SequenceStore
    factors: Factors
    key: str
    up_to_date: bool

    @property
    def section(self) -> IndexSection:
        assert self.config.index is not None  # prepare_index refuses a config without one
        return self.config.index


def _index_key(config: RunConfig, rd: RunDir) -> str:
    """What the index's bytes depend on: its settings and the fit (model, corpus, factors); not the batch size."""
    assert config.index is not None
    return digest({"index": config.index.config.to_dict()}, (rd.finished("fit") or {}).get("key"))


def prepare_index(config: RunConfig, *, overwrite: bool = False, model: nn.Module | None = None) -> IndexStagePlan:
    """Check every input of the index stage against the finished fit; nothing is written.

    An up-to-date index is kept; one of other settings is refused unless ``overwrite``.
    """
    from .scoring import _check_against_fit

    if config.index is None:
        raise InputError("no index settings (an index section or index flags)")
    rd = RunDir(config.run_dir)
    if not (rd.finished("fit") and (rd / layout.FACTORS_DIR / layout.MANIFEST_FILE).is_file()):
        raise InputError(f"{rd.path} has no fitted factors; run `lminfluence fit` first")
    tokenizer = load_tokenizer(config.model)
    model = model if model is not None else load_model(config.model)
    store = SequenceStore.load(rd.path)
    factors = load_run_factors(rd, model)
    _check_against_fit(rd, tokenizer, store, factors)
    IndexPlan.of(factors, config.index.config)  # settings these factors cannot index (ConfigError) before any write
    key = _index_key(config, rd)
    finished = rd.finished("index")
    up_to_date = finished is not None and finished.get("key") == key and (rd / layout.INDEX_DIR / MANIFEST).is_file() and not overwrite
    if finished is not None and not up_to_date and not overwrite:
        diffs = rd.differences("index", config) or ["other inputs"]
        raise InputError(
            f"{rd.path} already holds a gradient index of other settings ({'; '.join(diffs[:4])}); "
            "pass --overwrite to replace it (it stays until the new one is complete)"
        )
    up_to_date = dist.broadcast_object(up_to_date)  # rank 0 decides for all (torchrun)
    return IndexStagePlan(config, rd, model, store, factors, key, up_to_date)


def execute_index(plan: IndexStagePlan) -> GradientIndex | None:
    """Build the index in the staging area and commit it (call under ``rd.lock()``); the committed index on rank 0.

    Under torch.distributed every rank builds its share of the shards into the shared staging
    folder; rank 0 checks that they tile the corpus and commits.
    """
    rd, section = plan.rd, plan.section
    if plan.up_to_date:
        logger.info("the gradient index in %s is up to date; pass --overwrite to rebuild it", rd / layout.INDEX_DIR)
        return GradientIndex.open(rd / layout.INDEX_DIR) if dist.is_main() else None
    target = rd / layout.STAGING_DIR / "index" / layout.INDEX_DIR
    with dist.checked():  # rank 0 alone writes the manifest and clears leftovers: then every rank builds
        if dist.is_main():
            rd.staging("index", plan.key)
            IndexFiles.create(target, IndexPlan.of(plan.factors, section.config).manifest(plan.factors))
            remove_temporary_files(target)
    t0 = time.perf_counter()
    with dist.checked():
        build_index(
            plan.model, plan.factors, plan.store, target, section.config,
            execution=section.execution, rank=dist.rank(), world_size=dist.world_size(),
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    with dist.checked():
        if dist.is_main():
            index = GradientIndex.open(target)
            if index.num_sequences != len(plan.store):
                raise StaleError(f"{target} covers {index.num_sequences} of {len(plan.store)} sequences; run `lminfluence index` again")
            _commit(plan, index, seconds)
    return GradientIndex.open(rd / layout.INDEX_DIR) if dist.is_main() else None


def _commit(plan: IndexStagePlan, index: GradientIndex, seconds: float) -> None:
    cfg = plan.section.config
    size = sum(s.path.stat().st_size for s in index.shards)
    entry = {
        "key": plan.key,
        "method": cfg.method,
        "reduction": cfg.reduction,
        "dtype": cfg.dtype,
        "sequences": index.num_sequences,
        "bytes_per_sequence": index.bytes_per_sequence,
        "full_bytes_per_sequence": int(index.manifest["full_bytes_per_sequence"]),
        "shards": len(index.shards),
        "size_bytes": size,
        "manifest": manifest_digest(index),
        "seconds": round(seconds, 2),
    }
    plan.rd.commit("index", plan.config, entry)
    logger.info(
        "indexed %d sequences (%s, %s bytes each, %.1f MB in all) in %.1fs",
        index.num_sequences, cfg.method, f"{index.bytes_per_sequence:,}", size / 1e6, seconds,
    )  # fmt: skip


def manifest_digest(index: GradientIndex) -> str:
    """A digest of the index's manifest file and shard names: what scores made from it depend on."""
    h = hashlib.sha256((index.path / MANIFEST).read_bytes())
    for s in index.shards:
        h.update(s.path.name.encode())
    return h.hexdigest()[:16]


def open_run_index(rd: RunDir, factors: Factors, store: Any) -> GradientIndex:
    """The run's committed gradient index, checked against its factors and corpus (what ``score --index`` reads).

    Raises:
        InputError: there is none (never built, or removed by a refit).
        StaleError: it was built with other factors, settings or sequences (names `lminfluence index`).
    """
    path = rd / layout.INDEX_DIR
    again = f"`lminfluence index -o {rd.path} --overwrite`"
    if rd.finished("index") is None or not (path / MANIFEST).is_file():
        raise InputError(f"{rd.path} has no gradient index (a refit removes it); run `lminfluence index -o {rd.path}` first, or score without --index")
    index = GradientIndex.open(path)
    try:
        index.check(factors)
    except StaleError as e:
        raise StaleError(f"{e} with {again}") from e
    if index.num_sequences != len(store):
        raise StaleError(f"the gradient index at {path} holds {index.num_sequences} sequences, the corpus {len(store)}; build it again with {again}")
    return index


__all__ = ["IndexStagePlan", "prepare_index", "execute_index", "open_run_index", "manifest_digest"]
