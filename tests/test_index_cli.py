"""`lminfluence index` and `score --index` end to end.

The CLI against the Python API, the exact codec against a rescan, a refit, a killed build, bad options.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lminfluence as li
from lminfluence.cli.main import main
from lminfluence.corpus import SequenceStore
from lminfluence.index import GradientIndex, IndexConfig, build_index, two_stage_with_index
from lminfluence.scoring.two_stage import TwoStageConfig
from lminfluence.storage import layout
from test_cli import fit_args, snapshot

# eigen at 1/4, 20 sequences per shard (the fixture's GPT-2 stores 2,144 bytes per sequence), 4 sequences per batch
INDEX_ARGS = ["--method", "eigen", "--reduction", "4", "--shard-mib", str(20 * 2144 / 2**20), "--index-batch-size", "4"]
SCORE_ARGS = ["--index", "--candidates", "50", "--rescore-top", "12", "--top", "5", "--score-batch-size", "4", "--query-batch-size", "2"]
EXEC = li.Execution(batch_size=4, query_batch_size=2)


def files(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the hash of its bytes."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def fitted(inputs, tmp_path_factory):
    """A run directory with a finished fit (float32 GPT-2, 121 sequences of at most 32 tokens), never indexed."""
    run = tmp_path_factory.mktemp("fitted") / "run"
    assert main(fit_args(inputs, run)) == 0
    return run


def copy_of(run: Path, where: Path) -> Path:
    """A copy of a run directory (a run's files name no absolute path that matters)."""
    shutil.copytree(run, where)
    return where


@pytest.fixture(scope="module")
def indexed(inputs, fitted, tmp_path_factory):
    """``fitted`` copied, indexed and scored through the index."""
    run = copy_of(fitted, tmp_path_factory.mktemp("indexed") / "run")
    assert main(["index", "-o", str(run), "-q", *INDEX_ARGS]) == 0
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), "-q", *SCORE_ARGS]) == 0
    return run


def library_inputs(inputs, run: Path, dtype=None):
    """The model, the run's factors and corpus, and the queries, as the Python API takes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
    if dtype is not None:
        model = model.to(dtype)
    tok = AutoTokenizer.from_pretrained(inputs["model"])
    rows = [json.loads(line) for line in inputs["queries"].read_text().splitlines()]
    queries = li.examples_from_pairs(tok, [(r["prompt"], r["completion"]) for r in rows])
    return model, li.load_factors(run / layout.FACTORS_DIR, model), SequenceStore.load(run), queries


def test_cli_index_and_scores_equal_the_python_api(inputs, indexed, tmp_path):
    """The CLI's index and tables are those of build_index and two_stage_with_index.

    The same model, factors, settings and batches through the library: build_index writes the very bytes of
    `lminfluence index`, and two_stage_with_index gives the CLI's tables (which sequences are shown, in which
    order, their index and re-scored full-rank scores, per-layer and per-token details). The same computation
    in the same batches, so equal up to float32 round-off (1e-6 of the largest score).
    """
    model, factors, store, queries = library_inputs(inputs, indexed)
    config = IndexConfig(method="eigen", reduction=4.0, shard_mib=20 * 2144 / 2**20)
    index = build_index(model, factors, store, tmp_path / "index", config, execution=li.Execution(batch_size=4))
    assert files(indexed / layout.INDEX_DIR) == files(index.path)
    assert len(index.shards) == 7  # 121 sequences, 20 per shard: the shards are the unit of resuming

    result = two_stage_with_index(
        model, factors, index, queries, store, li.ScoreConfig(), TwoStageConfig(candidates=50, rescore_top=12, top=5), execution=EXEC
    )
    top = pd.read_parquet(indexed / layout.TOP_TABLE).sort_values(["query_index", "rank"], ascending=[True, False], kind="stable")
    scale = float(np.abs(top["score"]).max())
    for q, shown in enumerate(result.shown):
        rows = top[top.query_index == q].set_index("rank").loc[shown.ranks]
        assert rows["seq_index"].tolist() == shown.indices.tolist()
        np.testing.assert_allclose(rows["score"], shown.total, rtol=0, atol=1e-6 * scale)
        first = result.first[q, np.searchsorted(result.columns, shown.indices)]
        np.testing.assert_allclose(rows["first_stage_score"], first, rtol=0, atol=1e-6 * scale)
        assert (rows["score"] != rows["first_stage_score"]).all()  # the shown were re-scored at full rank by the model
        layers = pd.read_parquet(indexed / layout.LAYERS_TABLE)
        for name, values in shown.per_layer.items():
            mine = layers[(layers.query_index == q) & (layers.layer == name)].set_index("seq_index").loc[rows["seq_index"], "score"]
            np.testing.assert_allclose(mine, values, rtol=0, atol=1e-6 * scale)
        tokens = pd.read_parquet(indexed / layout.TOKENS_TABLE)
        for seq, per_token in zip(rows["seq_index"], shown.per_token):
            mine = tokens[(tokens.query_index == q) & (tokens.seq_index == seq)]["score"].to_numpy()
            np.testing.assert_allclose(mine, per_token[: len(mine)], rtol=0, atol=1e-6 * scale)
    tfidf = pd.read_parquet(indexed / layout.TOP_TABLE)["tfidf"]
    assert tfidf.notna().all()  # ranked within each query's 50 TF-IDF candidates
    entry = json.loads((indexed / layout.RUN_MANIFEST).read_text())
    assert entry["score"]["index"] is True and entry["index"]["sequences"] == len(store)


def test_exact_index_equals_the_rescan(inputs, tmp_path):
    """The exact codec's scan equals the rescan of `score` without an index.

    With `--method full` in float64 and a float64 model, the index stores every coordinate of R = Q_Sᵀ DW Q_A:
    the scan through it (first_stage_score, with the same shown sequences) equals `score` without an index to
    float64 round-off of two orders of summation (1e-10 of the largest score). --top 60 shows each query's 60 largest
    scores and the negative ones among the rest: over 200 of the 363 pairs.
    """
    run = tmp_path / "run"
    assert main([*fit_args(inputs, run), "--dtype", "float64"]) == 0
    assert main(["index", "-o", str(run), "-q", "--method", "full", "--storage-dtype", "float64"]) == 0
    common = ["score", "-o", str(run), "--queries", str(inputs["queries"]), "-q", "--top", "60", "--overwrite"]
    assert main(common) == 0
    rescan = pd.read_parquet(run / layout.TOP_TABLE)
    assert main([*common, "--index"]) == 0
    scan = pd.read_parquet(run / layout.TOP_TABLE)
    assert len(scan) == len(rescan) > 200 and scan[["query_index", "rank", "seq_index"]].equals(rescan[["query_index", "rank", "seq_index"]])
    scale = float(np.abs(rescan["first_stage_score"]).max())
    np.testing.assert_allclose(scan["first_stage_score"], rescan["first_stage_score"], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(scan["score"], rescan["score"], rtol=0, atol=1e-10 * scale)  # details from the model in both


def test_refit_makes_score_with_index_fail(inputs, indexed, tmp_path, capsys):
    """After a refit, `score --index` exits 2 naming `lminfluence index`.

    A refit (other label-sampling seed) removes the index with the old factors' results: `score --index` exits
    2 naming `lminfluence index`. An old index put back (a restored backup) is refused by its factors fingerprint,
    again naming the command; `lminfluence index` then rebuilds and scoring works.
    """
    run = copy_of(indexed, tmp_path / "run")
    saved_index, saved_entry = tmp_path / "old-index", json.loads((run / layout.RUN_MANIFEST).read_text())["index"]
    shutil.copytree(run / layout.INDEX_DIR, saved_index)
    assert main([*fit_args(inputs, run), "--seed", "1", "--overwrite"]) == 0
    assert not (run / layout.INDEX_DIR).exists()
    capsys.readouterr()
    score = ["score", "-o", str(run), "--queries", str(inputs["queries"]), "-q", *SCORE_ARGS]
    assert main(score) == 2
    err = capsys.readouterr().err
    assert "no gradient index" in err and "`lminfluence index -o" in err and len(err.strip().splitlines()) == 1, err

    shutil.copytree(saved_index, run / layout.INDEX_DIR)
    manifest = json.loads((run / layout.RUN_MANIFEST).read_text())
    (run / layout.RUN_MANIFEST).write_text(json.dumps({**manifest, "index": saved_entry}))
    assert main(score) == 2
    err = capsys.readouterr().err
    assert "other factors" in err and "`lminfluence index -o" in err and len(err.strip().splitlines()) == 1, err
    assert main(["index", "-o", str(run), "-q", "--overwrite", *INDEX_ARGS]) == 0
    assert main(score) == 0


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import lminfluence.index.build as build
    import lminfluence.index.store as store
    from lminfluence.cli.main import main

    kill_batch, kill_save, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    seen = {"batches": 0, "saves": 0}
    real_pass, real_save = build.run_pass, store.save_file

    def run_pass(*args, **kwargs):  # SIGKILL after the kill_batch-th batch of the build
        for batch in real_pass(*args, **kwargs):
            yield batch
            seen["batches"] += 1
            if seen["batches"] == kill_batch:
                os.kill(os.getpid(), signal.SIGKILL)

    def save_file(tensors, path, metadata=None):  # SIGKILL with a shard written under its temporary name
        real_save(tensors, path, metadata=metadata)
        seen["saves"] += 1
        if seen["saves"] == kill_save:
            os.kill(os.getpid(), signal.SIGKILL)

    build.run_pass, store.save_file = run_pass, save_file
    sys.exit(main(argv))
    """
)


def killed_index(run: Path, kill_batch: int = 0, kill_save: int = 0) -> None:
    """Run `lminfluence index` in a subprocess that SIGKILLs itself after a batch or a shard's write."""
    argv = ["index", "-o", str(run), "-q", *INDEX_ARGS]
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(kill_batch), str(kill_save), *argv], capture_output=True, text=True, env=os.environ)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


@pytest.mark.slow
def test_killed_index_resumes_to_the_same_files(fitted, indexed, tmp_path):
    """A killed `lminfluence index` resumes to the files of an uninterrupted one.

    SIGKILL in the middle of the third shard's batches, then (rerun) with the next shard written but not
    renamed: the staging area keeps the finished shards, nothing is committed, and a third run ends with exactly
    the files of an uninterrupted `lminfluence index` (7 shards of 5 batches each; about 30 s: two subprocesses).
    """
    run = copy_of(fitted, tmp_path / "run")
    staged = run / layout.STAGING_DIR / "index" / layout.INDEX_DIR / "shards"
    killed_index(run, kill_batch=12)
    assert sorted(p.name for p in staged.glob("*.safetensors")) == ["0000000000-0000000020.safetensors", "0000000020-0000000040.safetensors"]
    killed_index(run, kill_save=2)
    assert len(list(staged.glob("*.safetensors"))) == 3 and len(list(staged.glob(".*.tmp"))) == 1
    assert not (run / layout.INDEX_DIR).exists() and "index" not in json.loads((run / layout.RUN_MANIFEST).read_text())
    assert main(["index", "-o", str(run), "-q", *INDEX_ARGS]) == 0
    assert files(run / layout.INDEX_DIR) == files(indexed / layout.INDEX_DIR)
    assert not (run / layout.STAGING_DIR).exists()
    assert GradientIndex.open(run / layout.INDEX_DIR).num_sequences == 121


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--reduction", "0.5"], "reduction"),
        (["--method", "pca"], "method"),
        (["--storage-dtype", "int8"], "dtype"),
        (["--shard-mib", "0"], "shard_mib"),
        (["--index-batch-size", "0"], "batch_size"),
    ],
)
def test_bad_index_options_exit_2_before_writing(fitted, extra, needle, capsys):
    """Each bad value is refused with exit status 2 and one line naming the option; the run directory is untouched."""
    before = snapshot(fitted)
    assert main(["index", "-o", str(fitted), "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(fitted) == before
    with pytest.raises(SystemExit) as exit_info:  # not a number: argparse's own exit 2, with usage
        main(["index", "-o", str(fitted), "-q", "--reduction", "x"])
    assert exit_info.value.code == 2 and "expected a number" in capsys.readouterr().err
    assert snapshot(fitted) == before


def test_index_and_score_index_refuse_what_they_cannot_use(inputs, fitted, tmp_path, capsys):
    """Inputs the stage cannot use exit 2 before anything is written.

    `index` on a directory without a fit, `score --index` with no index
    built, `index` over factors without a per-layer eigenbasis (identity).
    """
    empty = tmp_path / "empty"
    assert main(["index", "-o", str(empty), "-q"]) == 2
    assert "`lminfluence fit` first" in capsys.readouterr().err and not empty.exists()
    before = snapshot(fitted)
    assert main(["score", "-o", str(fitted), "--queries", str(inputs["queries"]), "-q", "--index"]) == 2
    assert "`lminfluence index -o" in capsys.readouterr().err and snapshot(fitted) == before
    run = tmp_path / "identity"
    assert main([*fit_args(inputs, run), "--strategy", "identity"]) == 0
    before = snapshot(run)
    assert main(["index", "-o", str(run), "-q"]) == 2
    assert "eigenbasis" in capsys.readouterr().err and snapshot(run) == before


@pytest.mark.slow
def test_index_under_torchrun_writes_the_single_process_files(inputs, fitted, indexed, tmp_path):
    """Under torchrun, `lminfluence index` writes the files of one process.

    `torchrun --nproc-per-node 2`: each rank writes its own shards (cells c with c mod 2 = rank) into the shared
    staging folder, rank 0 commits; the same batches give the very files of one process. `score --index` under
    torchrun (re-scoring and details split over the ranks) then shows the same sequences with the same scores
    within 1e-5 of the largest (float32, other batch compositions). About 60 s.
    """
    from test_torchrun import torchrun

    run = copy_of(fitted, tmp_path / "run")
    done = torchrun("index", "-o", str(run), *INDEX_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("index:") == 1
    assert files(run / layout.INDEX_DIR) == files(indexed / layout.INDEX_DIR)
    assert not (run / layout.STAGING_DIR).exists()
    done = torchrun("score", "-o", str(run), "--queries", str(inputs["queries"]), *SCORE_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    mine, single = pd.read_parquet(run / layout.TOP_TABLE), pd.read_parquet(indexed / layout.TOP_TABLE)
    assert mine[["query_index", "rank", "seq_index"]].equals(single[["query_index", "rank", "seq_index"]])
    np.testing.assert_allclose(mine["score"], single["score"], rtol=0, atol=1e-5 * float(np.abs(single["score"]).max()))
