"""Crash safety: a fit killed with SIGKILL resumes from its checkpoint and ends with the same factors.

(The subprocess tests take a few seconds each on an idle machine; all but one are marked slow.
In-process tests make a fit fail with an exception instead, to cover resuming and invalidation fast.)

Each fit runs in a subprocess (one thread, so that its sums are reproducible
bit for bit) that checkpoints after every batch; ``LMINFLUENCE_TEST_KILL_AT``
makes it SIGKILL itself after its K-th batch (``batch:K``) or in the middle of
writing its K-th checkpoint (``checkpoint:K``: tensors written, the json
naming them not yet). 10 sequences in batches of 2: batches 1-5 are EK-FAC's
first pass, 6-10 its second; checkpoints 1-5 follow the first pass's batches,
6 closes the first pass, 7-11 follow the second pass's batches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lminfluence as li
from helpers import CrashingTask, random_sequences, tiny_llama
from lminfluence.curvature.checkpoint import CHECKPOINT_DIR, KILL_ENV

TESTS = Path(__file__).resolve().parent

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from helpers import random_sequences, tiny_llama
import lminfluence as li

out, seed = sys.argv[1], int(sys.argv[2])
model = tiny_llama(dtype=torch.float32, hidden=32, mlp=64)
train = random_sequences(10, lengths=(5, 12))
execution = li.Execution(batch_size=2, checkpoint_seconds=0)
factors = li.fit_factors(model, train, li.FactorConfig(seed=seed), execution=execution, output_dir=out)
print(json.dumps({{"resumed": factors.meta["resumed"]}}))
"""


def fit_in_subprocess(tmp_path: Path, out: Path, kill_at: str | None = None, seed: int = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, str(script), str(out), str(seed)], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The factors of an uninterrupted fit, made the same way."""
    tmp = tmp_path_factory.mktemp("reference")
    done = fit_in_subprocess(tmp, tmp / "factors")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"resumed": False}
    return load_file(str(tmp / "factors" / "factors.safetensors"))


def killed_then_resumed(tmp_path: Path, kills: list[str]) -> tuple[dict, list[bool]]:
    out = tmp_path / "factors"
    for point in kills:
        run = fit_in_subprocess(tmp_path, out, point)
        assert run.returncode == -signal.SIGKILL, (point, run.returncode, run.stderr[-2000:])
        assert (out / CHECKPOINT_DIR).is_dir() and not (out / "manifest.json").exists()
    final = fit_in_subprocess(tmp_path, out)
    assert final.returncode == 0, final.stderr
    assert not (out / CHECKPOINT_DIR).exists()  # removed once the factors are saved
    return load_file(str(out / "factors.safetensors")), json.loads(final.stdout.splitlines()[-1])["resumed"]


def assert_identical(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_killed_fit_resumes_to_identical_factors(tmp_path, reference):
    """Killed while writing a checkpoint in the second pass: the rerun resumes (it does not start
    over) and its factors equal the uninterrupted fit's bit for bit.
    """
    factors, resumed = killed_then_resumed(tmp_path, ["checkpoint:9"])
    assert resumed
    assert_identical(factors, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kills",
    [["batch:2"], ["batch:5"], ["checkpoint:6"], ["batch:8"], ["checkpoint:1"], ["batch:3", "batch:4"]],
    ids=lambda k: "+".join(k),
)
def test_killed_fit_resumes_to_identical_factors_at_more_points(tmp_path, reference, kills):
    """More kill points: in the first pass, after its last batch (its finalize not checkpointed),
    while writing the checkpoint that closes it, in the second pass, during the very first
    checkpoint (nothing usable yet: the rerun starts over), and twice in a row.
    """
    factors, resumed = killed_then_resumed(tmp_path, kills)
    assert resumed == (kills != ["checkpoint:1"])
    assert_identical(factors, reference)


def crash_then_fit(model, train, out, crash_at, config=li.FactorConfig()):
    CrashingTask.calls, CrashingTask.crash_at = 0, crash_at
    with pytest.raises(RuntimeError, match="simulated crash"):
        li.fit_factors(model, train, config, task=CrashingTask(), execution=EXECUTION, output_dir=out)
    CrashingTask.crash_at = None
    assert (out / CHECKPOINT_DIR / "checkpoint.json").is_file()


EXECUTION = li.Execution(batch_size=2, checkpoint_seconds=0, cache_gib=0)  # the second pass runs the model: forwards 6-10


@pytest.mark.parametrize("crash_at", [3, 6, 9])
def test_fit_failing_midway_resumes_to_identical_factors(tmp_path, crash_at):
    """In-process version of the kill tests (an exception instead of SIGKILL, at the 3rd, 6th and
    9th batch: first pass, start of the second, late in the second): the rerun resumes and its
    factors equal an uninterrupted fit's bit for bit.
    """
    model = tiny_llama(dtype=torch.float32, hidden=32, mlp=64)
    train = random_sequences(10, lengths=(5, 12))
    want = li.fit_factors(model, train, task=CrashingTask(), execution=EXECUTION)
    crash_then_fit(model, train, tmp_path / "f", crash_at)
    got = li.fit_factors(model, train, task=CrashingTask(), execution=EXECUTION, output_dir=tmp_path / "f")
    assert got.meta["resumed"]
    assert_identical(got.curvature.state_dict(), want.curvature.state_dict())
    assert got.num_tokens == want.num_tokens and got.num_sequences == want.num_sequences


def test_changed_inputs_invalidate_the_checkpoint(tmp_path):
    """A checkpoint is used only by a fit of the same model, data and settings: with another seed,
    other data or other weights the fit starts over (and equals a fresh fit); with the same ones it
    resumes.
    """
    model = tiny_llama(dtype=torch.float32, hidden=32, mlp=64)
    train = random_sequences(10, lengths=(5, 12))
    out = tmp_path / "f"
    crash_then_fit(model, train, out, 4)
    reseeded = li.fit_factors(model, train, li.FactorConfig(seed=1), task=CrashingTask(), execution=EXECUTION, output_dir=out)
    assert not reseeded.meta["resumed"] and not (out / CHECKPOINT_DIR).exists()
    fresh = li.fit_factors(model, train, li.FactorConfig(seed=1), task=CrashingTask(), execution=EXECUTION)
    assert_identical(reseeded.curvature.state_dict(), fresh.curvature.state_dict())

    crash_then_fit(model, train, out, 4)
    changed = list(train)
    changed[7] = {"input_ids": changed[7]["input_ids"].flip(0)}
    assert not li.fit_factors(model, changed, task=CrashingTask(), execution=EXECUTION, output_dir=out).meta["resumed"]

    crash_then_fit(model, train, out, 4)
    other = tiny_llama(seed=1, dtype=torch.float32, hidden=32, mlp=64)
    assert not li.fit_factors(other, train, task=CrashingTask(), execution=EXECUTION, output_dir=out).meta["resumed"]

    crash_then_fit(model, train, out, 4)
    assert li.fit_factors(model, train, task=CrashingTask(), execution=EXECUTION, output_dir=out).meta["resumed"]
