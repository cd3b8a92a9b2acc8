"""The command line under `torchrun --nproc-per-node 2` (gloo on CPU) writes the tables a single process writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dist_helpers import torchrun_fit
from lminfluence.cli.main import main
from lminfluence.storage import layout

RUN = ["--max-length", "32", "--candidates", "30", "--rank", "4", "--rescore-top", "8", "--top", "3", "--chunk-size", "8"]


def torchrun(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchrun")
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    return subprocess.run([str(exe), "--nproc-per-node", "2", "-m", "lminfluence", *args], capture_output=True, text=True, timeout=timeout, env=environment)


def tables(run: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run / f"scores/{t}.parquet") for t in ("queries", "top", "layers", "tokens", "matrix")}


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    base = ["run", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--queries", str(inputs["queries"]), "-o", str(run), "-q"]
    assert main(base + RUN) == 0
    return run


def test_run_under_torchrun_writes_the_single_process_tables(inputs, single, tmp_path):
    """Same rows in every table; scores of this float32 model within 1e-5 relative (other batch compositions),
    the same shown sequences in the same order; one report, written by rank 0."""
    run = tmp_path / "run"
    done = torchrun("run", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--queries", str(inputs["queries"]), "-o", str(run), *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report:") == 1 and (run / layout.REPORT_FILE).is_file()
    assert_close_tables(tables(single), tables(run))
    assert not (run / layout.STAGING_DIR).exists() and not (run / layout.LOCK_FILE).read_text()


def assert_close_tables(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    """Same rows; floats within 1e-5 relative (a float32 model under other batch compositions); ids, ranks and texts equal."""
    for name in a:
        assert a[name].shape == b[name].shape, name
        for col in a[name].columns:
            x, y = a[name][col], b[name][col]
            if x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(x)), err_msg=f"{name}.{col}")
            elif x.dtype.kind in "iub" or col in ("doc_id", "query_id", "text", "token"):
                assert (x.to_numpy() == y.to_numpy()).all(), f"{name}.{col}"


# ------------------------------------------------------------ a rank killed during a fit

FIT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from helpers import random_sequences, tiny_llama
import lminfluence as li

li.distributed.init("cpu")
model = tiny_llama(dtype=torch.float32, hidden=32, mlp=64)
train = random_sequences(10, lengths=(5, 12))
factors = li.fit_factors(model, train, execution=li.Execution(batch_size=2, checkpoint_seconds=0), output_dir=sys.argv[1])
print(json.dumps({{"rank": li.distributed.rank(), "resumed": factors.meta["resumed"]}}))
li.distributed.shutdown()
"""


def fit_under_torchrun(tmp_path: Path, out: Path, kill: str | None = None, rank: int = 1) -> subprocess.CompletedProcess:
    return torchrun_fit(tmp_path / "fit.py", FIT, out, kill, rank)


@pytest.fixture(scope="module")
def reference_fit(tmp_path_factory):
    """The factors of an uninterrupted 2-process fit."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("reference_fit")
    done = fit_under_torchrun(tmp, tmp / "factors")
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(tmp / "factors" / "factors.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["batch:5", "checkpoint:4"])
def test_a_rank_killed_during_a_fit_stops_all_and_the_rerun_resumes_to_identical_factors(tmp_path, reference_fit, kill):
    """Rank 1 SIGKILLs itself (10 sequences, 5 per rank in batches of 2: batch 5 is in EK-FAC's second pass;
    checkpoint 4, the one that closes the first pass, is cut between its tensors and its json, so rank 1
    may restart a pass behind rank 0). torchrun stops the other rank and fails naming the killed rank and
    its signal; the rerun resumes from each rank's checkpoint and writes factors equal bit for bit to an
    uninterrupted 2-process fit (same shards, same batches, one thread each: the same additions in the same order)."""
    import json

    import torch
    from safetensors.torch import load_file

    out = tmp_path / "factors"
    killed = fit_under_torchrun(tmp_path, out, kill)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or "Signal 9" in killed.stderr, killed.stderr[-3000:]
    assert "rank    : 1" in killed.stderr or "rank: 1" in killed.stderr, killed.stderr[-3000:]
    assert not (out / "manifest.json").exists() and (out / "checkpoint" / "rank-1-of-2").is_dir()
    rerun = fit_under_torchrun(tmp_path, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # each rank prints one object; their writes to the shared pipe may land on one line ('{...}{...}\n\n')
    reports = [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", rerun.stdout)]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["resumed"] for r in reports)
    assert not (out / "checkpoint" / "rank-0-of-2").exists() and not (out / "checkpoint" / "rank-1-of-2").exists()
    got = load_file(str(out / "factors.safetensors"))
    assert got.keys() == reference_fit.keys()
    for key, expected in reference_fit.items():
        assert torch.equal(got[key], expected), key


# ------------------------------------------------------------ a rank killed during a score

# RUN's score settings; one query per re-score and details piece: 3 of each, rank 1 owns the middle one
SCORE = ["--candidates", "30", "--rank", "4", "--rescore-top", "8", "--top", "3", "--chunk-size", "8", "--query-batch-size", "1"]


@pytest.fixture(scope="module")
def fitted(inputs, tmp_path_factory):
    """A run directory with fitted factors (one process); each score test works on a copy."""
    run = tmp_path_factory.mktemp("fitted") / "run"
    assert main(["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "-o", str(run), "--max-length", "32", "-q"]) == 0
    return run


def score_under_torchrun(inputs, fitted: Path, run: Path, kill: str | None = None, rank: int = 1) -> subprocess.CompletedProcess:
    """``lminfluence score`` on 2 processes into ``run`` (a copy of ``fitted`` made the first time), one thread each."""
    from lminfluence.curvature.checkpoint import KILL_ENV, KILL_RANK_ENV

    if not run.exists():
        shutil.copytree(fitted, run)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    if kill:
        env.update({KILL_ENV: kill, KILL_RANK_ENV: str(rank)})
    return torchrun("score", "-o", str(run), "--queries", str(inputs["queries"]), *SCORE, env=env)


@pytest.fixture(scope="module")
def reference_scores(inputs, fitted, tmp_path_factory):
    """The tables of an uninterrupted 2-process score and of a 1-process score of the same factors."""
    tmp = tmp_path_factory.mktemp("reference_scores")
    done = score_under_torchrun(inputs, fitted, tmp / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(fitted, tmp / "one")
    assert main(["score", "-o", str(tmp / "one"), "--queries", str(inputs["queries"]), *SCORE, "-q"]) == 0
    return tables(tmp / "two"), tables(tmp / "one")


def chunks_done(stderr: str) -> dict[str, int]:
    """What the rerun's log says it found finished: stage → number of pieces."""
    return {m[1]: int(m[2]) for m in re.finditer(r"(scan|re-score|details)[^:\n]*: (\d+) of \d+ chunks already done", stderr)}


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["chunk:1", "chunk:5"])
def test_a_rank_killed_during_a_score_stops_all_and_the_rerun_resumes_to_identical_tables(inputs, fitted, reference_scores, tmp_path, kill):
    """A killed rank stops the score on every rank, and the rerun resumes from both ranks' pieces to the same tables.

    Rank 1 SIGKILLs itself after saving its n-th piece (63 sequences in 8 scan chunks of 8, 4 per rank, then 3
    re-score pieces): chunk 1 is mid-scan with rank 0 still working, chunk 5 is rank 1's re-score piece, after every
    scan chunk of both ranks. torchrun stops the other rank and fails naming the killed rank and its signal, within
    the subprocess timeout (a hang raises TimeoutExpired). The rerun reuses every piece the killed run left, of both
    ranks (its log counts them), and writes tables equal bit for bit to an uninterrupted 2-process score (one thread
    each: every piece is the same computation whichever rank makes it) and close to a 1-process score (float32
    model, other query groups in preconditioning: 1e-5 relative, ids and ranks equal).
    """
    run = tmp_path / "run"
    killed = score_under_torchrun(inputs, fitted, run, kill)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or "Signal 9" in killed.stderr, killed.stderr[-3000:]
    assert "rank    : 1" in killed.stderr or "rank: 1" in killed.stderr, killed.stderr[-3000:]
    assert not (run / layout.SCORES_DIR).exists()
    left = sorted(p.stem for p in (run / layout.STAGING_DIR / "score" / "partial").glob("*.npz"))
    q = len(inputs["queries"].read_text().splitlines())  # the rank-4 scan: one group of all the queries
    assert f"scan-q{q}-0000-0000000008" in left  # rank 1's first chunk
    if kill == "chunk:5":  # the scan ended on both ranks before the re-score began
        assert {f"scan-q{q}-0000-{8 * c:010d}" for c in range(8)} | {"rescore-q1-0001"} <= set(left)
    rerun = score_under_torchrun(inputs, fitted, run)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    expected = {stage: sum(n.startswith(prefix) for n in left) for stage, prefix in (("scan", "scan-"), ("re-score", "rescore-"), ("details", "details-"))}
    assert chunks_done(rerun.stderr) == {k: v for k, v in expected.items() if v}, rerun.stderr[-3000:]
    assert not (run / layout.STAGING_DIR).exists() and not (run / layout.LOCK_FILE).read_text()
    two, one = reference_scores
    got = tables(run)
    for name in two:
        pd.testing.assert_frame_equal(got[name], two[name], check_exact=True, obj=name)
    assert_close_tables(one, got)
