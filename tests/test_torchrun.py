"""The command line under `torchrun --nproc-per-node 2` (gloo on CPU) writes the tables a single process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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
    a, b = tables(single), tables(run)
    for name in a:
        assert a[name].shape == b[name].shape, name
        for col in a[name].columns:
            x, y = a[name][col], b[name][col]
            if x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(x)), err_msg=f"{name}.{col}")
            elif x.dtype.kind in "iub" or col in ("doc_id", "query_id", "text", "token"):
                assert (x.to_numpy() == y.to_numpy()).all(), f"{name}.{col}"
    assert not (run / layout.STAGING_DIR).exists() and not (run / layout.LOCK_FILE).read_text()


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
    from lminfluence.curvature.checkpoint import KILL_ENV, KILL_RANK_ENV

    script = tmp_path / "fit.py"
    script.write_text(FIT.format(tests=str(Path(__file__).resolve().parent)))
    exe = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, KILL_RANK_ENV)}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if kill:
        env.update({KILL_ENV: kill, KILL_RANK_ENV: str(rank)})
    return subprocess.run([str(exe), "--nproc-per-node", "2", str(script), str(out)], capture_output=True, text=True, timeout=600, env=env)


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
    reports = [json.loads(line) for line in rerun.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["resumed"] for r in reports)
    assert not (out / "checkpoint" / "rank-0-of-2").exists() and not (out / "checkpoint" / "rank-1-of-2").exists()
    got = load_file(str(out / "factors.safetensors"))
    assert got.keys() == reference_fit.keys()
    for key, expected in reference_fit.items():
        assert torch.equal(got[key], expected), key
