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
