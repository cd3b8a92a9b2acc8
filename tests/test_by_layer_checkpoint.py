"""Crash safety of a fit with layer-owned factors (``Execution(factor_placement="by_layer")``) on 2 CPU processes.

Each rank's sums hold every rank's captures of its own layers, so the ranks' checkpoints are valid only
together (``InStepCheckpoint``): they save at the same batches, each keeps its previous checkpoint, and a
rerun resumes every rank from the latest checkpoint all of them hold.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from dist_helpers import run_ranks, torchrun_fit


class _Stub:
    """The part of a curvature a checkpoint reads and writes: one tensor, the shared-A map, the owners, the dtype."""

    def __init__(self, value: float | None = None) -> None:
        import torch

        self.value = None if value is None else torch.full((2,), value, dtype=torch.float64)
        self.shared_a: dict[str, str] = {}
        self.dtype = torch.float64
        self.owners: dict[str, int] | None = {"x": 0, "y": 1} if value is not None else None

    def state_dict(self):
        return {"x::a_sum": self.value}

    def load_state_dict(self, flat, shared_a=None):
        self.value = flat["x::a_sum"]

    def own(self, owners, rank):
        self.owners = dict(owners)


def _in_step(root: str, rank1_saves: int):
    """Rank 0 saves 3 checkpoints (values 1, 2, 3), rank 1 ``rank1_saves`` (its next one cut between its tensors and
    its json); then both restore, save once more, and report what they resumed from and what the directory holds."""
    from lminfluence import distributed as d
    from lminfluence.curvature.checkpoint import CHECKPOINT_FILE, InStepCheckpoint, Progress, checkpoint_dir
    from lminfluence.storage.atomic import atomic_write

    directory = checkpoint_dir(Path(root))
    due = [InStepCheckpoint(directory, "key", interval).due() for interval in ((0.0, 1e9) if d.rank() == 0 else (1e9, 0.0))]
    first = InStepCheckpoint(directory, "key", 0.0)
    for g in range(1, (3 if d.rank() == 0 else rank1_saves) + 1):
        first.save(_Stub(float(g)), Progress(start=g, batch_size=1))
    if d.rank() == 1:  # a state file without the json naming it: a kill in the middle of a save
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "state-999999-1.safetensors", lambda tmp: Path(tmp).write_bytes(b"cut"))
    curvature = _Stub()
    again = InStepCheckpoint(directory, "key", 0.0)
    progress = again.restore(curvature)
    out = {"due": due, "start": None if progress is None else progress.start, "owners": curvature.owners}
    out["value"] = None if curvature.value is None else curvature.value.tolist()
    if progress is not None:
        again.save(_Stub(30.0), Progress(start=3, batch_size=1))
        meta = json.loads((directory / CHECKPOINT_FILE).read_text())
        out["generations"] = (meta["generation"], meta["previous"]["generation"])
        out["states"] = sorted(p.name for p in directory.glob("state-*"))
        out["previous_file"] = meta["previous"]["file"]
    else:
        out["exists"] = directory.exists()
    return out


def _both(root: str):
    """``_in_step`` with rank 1 holding 2 checkpoints, then none (in other directories)."""
    return _in_step(f"{root}/a", 2), _in_step(f"{root}/b", 0)


def test_ranks_resume_from_the_latest_checkpoint_they_all_hold(tmp_path):
    """Rank 1 holds checkpoints 1 and 2 (its 3rd cut before its json), rank 0 holds 2 and 3: both restore
    checkpoint 2 (rank 0 goes back to its previous one) with the owners saved with it, their next save is
    generation 3 on both with 2 as previous, and only those two state files remain. When rank 1 holds none,
    neither rank resumes and rank 0's checkpoint is removed. Whether a checkpoint is due is rank 0's decision."""
    results = run_ranks(_both, str(tmp_path))
    assert [s for s, _ in results] == ["ok", "ok"], results
    for got in (r[0] for _, r in results):
        assert got["due"] == [True, False]  # rank 0's clock decides, not rank 1's
        assert got["start"] == 2 and got["value"] == [2.0, 2.0] and got["owners"] == {"x": 0, "y": 1}, got
        assert got["generations"] == (3, 2) and len(got["states"]) == 2 and got["previous_file"] in got["states"], got
    for got in (r[1] for _, r in results):
        assert got["start"] is None and got["value"] is None and not got["exists"], got


# ------------------------------------------------------------ a rank killed during a by_layer fit under torchrun

FIT = """
import json, sys
sys.path.insert(0, {tests!r})
from torch.distributed.fsdp import fully_shard
from helpers import random_sequences, tiny_llama
import lminfluence as li

li.distributed.init("cpu")
model = tiny_llama(layers=2)
for block in model.model.layers:
    fully_shard(block)
fully_shard(model)
train = random_sequences(12)
execution = li.Execution(batch_size=2, checkpoint_seconds=0, factor_placement="by_layer")
factors = li.fit_factors(model, train, execution=execution, output_dir=sys.argv[1])
print(json.dumps({{"rank": li.distributed.rank(), "resumed": factors.meta["resumed"], "held": sorted(factors.curvature.state)}}))
li.distributed.shutdown()
"""


def fit_under_torchrun(tmp_path: Path, out: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    """The by_layer fit of ``FIT`` under ``torchrun --nproc-per-node 2``; with ``kill``, rank 1 SIGKILLs itself there."""
    return torchrun_fit(tmp_path / "fit.py", FIT, out, kill)


def reports(stdout: str) -> list[dict]:
    """Each rank's printed object (their writes to the shared pipe may land on one line)."""
    return [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", stdout)]


@pytest.fixture(scope="module")
def reference_fit(tmp_path_factory):
    """The factors of an uninterrupted by_layer fit on 2 processes, and each rank's layers."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("reference_by_layer")
    done = fit_under_torchrun(tmp, tmp / "factors")
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(tmp / "factors" / "factors.safetensors")), {r["rank"]: r["held"] for r in reports(done.stdout)}


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["batch:4", "checkpoint:4"])
def test_a_rank_killed_during_a_by_layer_fit_stops_all_and_the_rerun_resumes_to_identical_factors(tmp_path, reference_fit, kill):
    """An FSDP-sharded float64 Llama, 12 sequences (6 per rank in batches of 2: 3 batches per pass, a checkpoint
    after each and one closing the pass). Rank 1 SIGKILLs itself after batch 4 (EK-FAC's second pass, before its
    checkpoint) or while writing checkpoint 4, the one that closes the first pass, between its tensors and its
    json (rank 0 may have written its own: it must go back one). torchrun stops the other rank and fails naming
    the killed rank and its signal; the rerun resumes both ranks from the same checkpoint, with the same owners,
    and writes factors equal bit for bit to the uninterrupted fit's (same batches, one thread each, each owner
    adding the same captures in the same order)."""
    import torch
    from safetensors.torch import load_file

    expected, held = reference_fit
    out = tmp_path / "factors"
    killed = fit_under_torchrun(tmp_path, out, kill)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or "Signal 9" in killed.stderr, killed.stderr[-3000:]
    assert "rank    : 1" in killed.stderr or "rank: 1" in killed.stderr, killed.stderr[-3000:]
    assert not (out / "manifest.json").exists() and (out / "checkpoint" / "rank-1-of-2" / "checkpoint.json").is_file()
    rerun = fit_under_torchrun(tmp_path, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got_reports = reports(rerun.stdout)
    assert sorted(r["rank"] for r in got_reports) == [0, 1] and all(r["resumed"] for r in got_reports), rerun.stdout
    assert {r["rank"]: r["held"] for r in got_reports} == held
    assert not (out / "checkpoint" / "rank-0-of-2").exists() and not (out / "checkpoint" / "rank-1-of-2").exists()
    got = load_file(str(out / "factors.safetensors"))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

