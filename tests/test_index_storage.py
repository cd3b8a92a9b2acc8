"""The gradient index on disk: appending, ranks, stale and corrupted indexes, and builds killed mid-way."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import allclose_report, random_queries, random_sequences, tiny_llama

import lminfluence as li
from lminfluence.errors import CorruptFileError, InputError, StaleError
from lminfluence.index import GradientIndex, IndexConfig, build_index, score_with_index
from lminfluence.index.plan import IndexPlan
from lminfluence.index.store import SHARD_DIR

EXEC = li.Execution(batch_size=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny float64 Llama, its EK-FAC factors (also saved, for the subprocesses), 12 sequences, 2 queries,
    and index settings giving 4 sequences per shard."""
    model = tiny_llama()
    train = random_sequences(12)
    queries = random_queries(2)
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac"), execution=EXEC)
    path = factors.save(tmp_path_factory.mktemp("factors"))
    return model, factors, train, queries, four_per_shard(factors), path


def four_per_shard(factors, dtype: str = "float16") -> IndexConfig:
    """eigen at 1/4 with a shard size that holds 4 sequences."""
    per_seq = IndexPlan.of(factors, IndexConfig(method="eigen", reduction=4.0, dtype=dtype)).bytes_per_sequence
    config = IndexConfig(method="eigen", reduction=4.0, dtype=dtype, shard_mib=4.5 * per_seq / 2**20)
    assert IndexPlan.of(factors, config).sequences_per_shard == 4
    return config


def files(path: Path) -> dict[str, str]:
    """Every file under an index directory with the hash of its bytes."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()}


def test_appending_equals_building_at_once(setup, tmp_path):
    """Indexing 6 sequences, then 10, then 12 (adding shards [4, 6), [6, 8), [8, 10), [10, 12) after [0, 4))
    scores like one build over all 12 (float64 round-off of other batch paddings: 1e-12 relative)."""
    model, factors, train, queries, _, _ = setup
    cfg = four_per_shard(factors, "float64")
    for n in (6, 10, 12):
        grown = build_index(model, factors, train[:n], tmp_path / "grown", cfg, execution=EXEC)
    at_once = build_index(model, factors, train, tmp_path / "once", cfg, execution=EXEC)
    assert [(s.start, s.end) for s in grown.shards] == [(0, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    assert [(s.start, s.end) for s in at_once.shards] == [(0, 4), (4, 8), (8, 12)]
    want = score_with_index(model, factors, at_once, queries, execution=EXEC).total
    got = score_with_index(model, factors, grown, queries, execution=EXEC).total
    allclose_report(got, want, rtol=0, atol=1e-12 * float(want.abs().max()), what="appended")


def test_ranks_write_disjoint_shards_that_make_the_single_process_index(setup, tmp_path):
    """With world_size 2, rank 0 writes cells 0 and 2, rank 1 cell 1; until both are done the index is refused
    as incomplete; together they are byte for byte the single-process build."""
    model, factors, train, queries, config, _ = setup
    single = build_index(model, factors, train, tmp_path / "single", config, execution=EXEC)
    assert build_index(model, factors, train, tmp_path / "dp", config, execution=EXEC, rank=0, world_size=2) is None
    assert sorted(p.name for p in (tmp_path / "dp" / SHARD_DIR).iterdir()) == ["0000000000-0000000004.safetensors", "0000000008-0000000012.safetensors"]
    with pytest.raises(CorruptFileError, match="sequences 4..7 are missing"):
        GradientIndex.open(tmp_path / "dp")
    build_index(model, factors, train, tmp_path / "dp", config, execution=EXEC, rank=1, world_size=2)
    assert files(tmp_path / "dp") == files(single.path)


def test_stale_index_is_refused(setup, tmp_path):
    """Other factors, another model, other sequences or other settings: StaleError, naming what to do."""
    model, factors, train, queries, config, _ = setup
    index = build_index(model, factors, train, tmp_path / "idx", config, execution=EXEC)
    refit = li.fit_factors(model, train, li.FactorConfig(strategy="ekfac", seed=1), execution=EXEC)
    with pytest.raises(StaleError, match="other factors"):
        score_with_index(model, refit, index, queries)
    other = tiny_llama(seed=5)
    other_factors = li.fit_factors(other, train, li.FactorConfig(strategy="ekfac"), execution=EXEC)
    with pytest.raises(StaleError, match="another model"):
        score_with_index(other, other_factors, index, queries)
    changed = list(train)
    changed[5] = {"input_ids": torch.as_tensor(changed[5]["input_ids"]).flip(0)}
    with pytest.raises(StaleError, match="sequences 4..7"):
        score_with_index(model, factors, index, queries, train=changed)
    with pytest.raises(StaleError, match="corpus changed"):
        build_index(model, factors, changed, tmp_path / "idx", config, execution=EXEC)
    with pytest.raises(StaleError, match="sequences up to 11"):
        build_index(model, factors, train[:8], tmp_path / "idx", config, execution=EXEC)
    with pytest.raises(StaleError, match="other settings: method .eigen. → .svd."):
        build_index(model, factors, train, tmp_path / "idx", IndexConfig(method="svd"), execution=EXEC)
    with pytest.raises(InputError, match="not a gradient index"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "x.txt").write_text("x")
        build_index(model, factors, train, tmp_path / "junk", config, execution=EXEC)


def test_corrupted_index_is_refused_and_rebuilt(setup, tmp_path):
    """A flipped byte in a shard fails its checksum, a truncated shard cannot be read, a missing shard leaves a
    gap, a damaged manifest is named: CorruptFileError each time. Deleting the shard and building again
    restores the index byte for byte."""
    model, factors, train, queries, config, _ = setup
    index = build_index(model, factors, train, tmp_path / "idx", config, execution=EXEC)
    clean = files(index.path)
    shard = index.shards[1].path
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        score_with_index(model, factors, GradientIndex.open(index.path), queries)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptFileError, match="cannot be read"):
        score_with_index(model, factors, GradientIndex.open(index.path), queries)
    shard.unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        GradientIndex.open(index.path)
    build_index(model, factors, train, index.path, config, execution=EXEC)
    assert files(index.path) == clean
    manifest = index.path / "index.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CorruptFileError, match="index.json is damaged"):
        GradientIndex.open(index.path)


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import lminfluence as li
    import lminfluence.storage.atomic as atomic
    from helpers import random_sequences, tiny_llama
    from lminfluence.index import IndexConfig, build_index

    out, factors_path, kill_batch, kill_rename, shard_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    model = tiny_llama()
    factors = li.load_factors(factors_path, model)
    seen = {"batches": 0, "renames": 0}

    def on_batch(rows, captures):
        seen["batches"] += 1
        if seen["batches"] == kill_batch:
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace

    def replace(src, dst):  # SIGKILL with the file written under its temporary name, before the rename
        seen["renames"] += 1
        if seen["renames"] == kill_rename:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    atomic.os.replace = replace
    config = IndexConfig(method="eigen", reduction=4.0, shard_mib=shard_mib)
    build_index(model, factors, random_sequences(12), out, config, execution=li.Execution(batch_size=2), on_batch=on_batch)
    """
)


def killed_build(out: Path, factors_path: Path, config: IndexConfig, kill_batch: int = 0, kill_rename: int = 0) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", SCRIPT, str(out), str(factors_path), str(kill_batch), str(kill_rename), repr(config.shard_mib)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_killed_builds_resume_to_the_same_bytes(setup, tmp_path):
    """SIGKILL while the manifest is renamed into place, in the middle of a shard's batches, and between a
    shard's write and its rename; each rerun keeps the finished shards, and the last one ends with exactly the
    files of an uninterrupted build (no temporary file left)."""
    model, factors, train, queries, config, factors_path = setup
    clean = files(build_index(model, factors, train, tmp_path / "clean", config, execution=EXEC).path)
    out = tmp_path / "killed"
    killed_build(out, factors_path, config, kill_rename=1)  # the manifest's rename: nothing there yet
    assert not (out / "index.json").exists()
    killed_build(out, factors_path, config, kill_batch=3)  # 2 batches per shard: after shard 0, in shard 1
    assert [p.name[:21] for p in sorted((out / SHARD_DIR).glob("*.safetensors"))] == ["0000000000-0000000004"]
    killed_build(out, factors_path, config, kill_rename=2)  # shard [4, 8) written, not yet renamed
    assert len(list((out / SHARD_DIR).glob(".*.tmp"))) == 1
    index = build_index(model, factors, train, out, config, execution=EXEC)
    assert files(out) == clean
    assert score_with_index(model, factors, index, queries).total.shape == (len(queries), len(train))
