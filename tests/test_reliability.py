"""The README's promises, one test per defect the reliability review found (every input checked first,
exit 2 with one line, nothing lost or mixed, stale inputs refused, readable files, progress without a terminal)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_fixture import corpus_texts, write_jsonl
from test_cli import fit_args, snapshot
from test_cli_errors import refuses

import lminfluence as li
from lminfluence.cli.main import main
from lminfluence.errors import InputError, StaleError
from lminfluence.storage import layout
from lminfluence.workflow.rundir import RunDir

SCORE = ["--candidates", "20", "--rank", "2", "--rescore-top", "4", "--top", "3", "--chunk-size", "8", "-q"]


@pytest.fixture(scope="module")
def scored(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("scored") / "run"
    assert main(fit_args(inputs, run)) == 0
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), *SCORE]) == 0
    assert main(["report", "-o", str(run), "-q"]) == 0
    return run


def copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_cli_needs_no_dev_package(tmp_path):
    """Every command's --help and the demo's, report's and analyses' imports work with the dev-only
    packages (pandas, datasets, scikit-learn, pillow, powerlaw) made unimportable, as after a plain install."""
    code = """
import sys
BLOCKED = {"pandas", "datasets", "sklearn", "PIL", "powerlaw", "matplotlib"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
import lminfluence.cli.demo, lminfluence.demo.summary, lminfluence.analysis, lminfluence.report
from lminfluence.cli.main import main
for command in ("fit", "score", "run", "report", "analyze", "compare", "demo"):
    try:
        main([command, "--help"])
    except SystemExit as e:
        assert e.code == 0, (command, e.code)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_bad_damping_is_refused_before_anything_is_written(scored, tmp_path, capsys):
    """-1, nan, inf or a YAML string for the damping: exit 2 naming the option, with and without
    --overwrite, and the earlier scores and report untouched (they used to be deleted first)."""
    run = copy(scored, tmp_path)
    for value in ("-1", "nan", "inf"):
        for extra in ([], ["--overwrite"]):
            refuses(["score", "-o", str(run), "--damping-scale", value, *extra], capsys, "damping_scale", untouched=run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("score: {damping_scale: lots}\n")
    refuses(["score", "-o", str(run), "--config", str(cfg), "--overwrite"], capsys, "damping_scale", untouched=run)
    cfg.write_text("score: {save_matrix: 'no'}\n")  # a quoted string is not a boolean
    refuses(["score", "-o", str(run), "--config", str(cfg)], capsys, "save_matrix must be true or false", untouched=run)


def test_overwrite_swaps_in_complete_results_only(inputs, scored, tmp_path, monkeypatch, capsys):
    """An --overwrite interrupted half-way leaves the earlier scores and report as they were; the rerun
    resumes and replaces them. A damaged TF-IDF cache is rebuilt, not a traceback."""
    import lminfluence.scoring.two_stage as two_stage

    run = copy(scored, tmp_path)
    before = snapshot(run / layout.SCORES_DIR), snapshot(run / layout.REPORT_DIR)
    real = two_stage.score_preconditioned
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(two_stage, "score_preconditioned", flaky)
    args = ["score", "-o", str(run), "--queries", str(inputs["queries"]), "--top", "2", "--chunk-size", "8", "--overwrite", "-q"]
    assert main(args) == 130
    assert (snapshot(run / layout.SCORES_DIR), snapshot(run / layout.REPORT_DIR)) == before
    monkeypatch.setattr(two_stage, "score_preconditioned", real)
    truncate(run / layout.TFIDF_FILE)
    assert main(args + ["--candidates", "20"]) == 0
    assert not (run / layout.REPORT_DIR).exists() and not (run / layout.STAGING_DIR).exists()
    top = json.loads((run / layout.RUN_MANIFEST).read_text())["score"]
    assert (top["top"], top["candidates"]) == (2, 20)


def _edit_embedding(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    name = next(k for k in tensors if "wte" in k)
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def test_changed_model_tokenizer_or_corpus_is_refused(inputs, tmp_path, capsys):
    """After `fit`, an untracked weight (the embedding), the tokenizer, or corpus/ of another run makes
    `score` exit 2 naming what changed, instead of scoring against stale factors or token ids."""
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    run = tmp_path / "run"
    args = fit_args(inputs, run)
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 0
    score = ["score", "-o", str(run), "--queries", str(inputs["queries"]), "-q"]
    _edit_embedding(model)
    refuses(score, capsys, "different model", untouched=run)
    shutil.rmtree(model)
    shutil.copytree(inputs["model"], model)
    spec = json.loads((model / "tokenizer.json").read_text())  # the same size, two tokens' ids swapped
    vocab = spec["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model / "tokenizer.json").write_text(json.dumps(spec))
    refuses(score, capsys, "tokenizer changed", untouched=run)
    shutil.rmtree(model)
    shutil.copytree(inputs["model"], model)
    assert main(score) == 0
    small = write_jsonl(tmp_path / "small.jsonl", [{"id": f"s{i}", "text": t} for i, t in enumerate(corpus_texts(6, seed=5))])
    elsewhere = tmp_path / "elsewhere"
    args[args.index("--corpus") + 1] = str(small)
    args[args.index("-o") + 1] = str(elsewhere)
    assert main(args) == 0
    shutil.rmtree(run / layout.CORPUS_DIR)
    shutil.copytree(elsewhere / layout.CORPUS_DIR, run / layout.CORPUS_DIR)
    refuses(score + ["--overwrite"], capsys, "not the corpus this run was fitted on", untouched=run)


def test_python_api_refuses_factors_of_a_changed_model():
    """load_factors(path, model=...) and compute_scores refuse factors once any weight changed, the
    embeddings included (not only the tracked layers)."""
    from helpers import random_queries, random_sequences, tiny_gpt2

    model, train, queries = tiny_gpt2(), random_sequences(6), random_queries(2)
    factors = li.fit_factors(model, train)
    li.compute_scores(model, factors, queries, train)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        li.compute_scores(model, factors, [{"input_ids": [1, 2, 99], "labels": [-100, 2, 99]}], train)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        li.Scores(torch.zeros(1, 3)).top_k(-1)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1e-3)
    with pytest.raises(StaleError, match="different model"):
        li.compute_scores(model, factors, queries, train)


def test_one_command_at_a_time(inputs, scored, tmp_path, capsys):
    """A second command on a run directory that another one is writing is refused at once (no mixing)."""
    run = copy(scored, tmp_path)
    with RunDir(run).lock():
        refuses(["score", "-o", str(run), "--queries", str(inputs["queries"]), "--top", "2", "--overwrite", "-q"], capsys, "another lminfluence command", untouched=run)


def test_misspelt_section_and_unknown_keys(inputs, tmp_path, capsys):
    """A misspelt YAML section (`fitt:`) is refused, not ignored; so are non-bool flags in the API."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {inputs['model']}}}\ncorpus: {{path: {inputs['corpus']}}}\nfitt: {{strategy: kfac}}\n")
    refuses(["fit", "--config", str(cfg), "-o", str(tmp_path / "run")], capsys, "unknown section(s) fitt", untouched=tmp_path / "run")
    with pytest.raises(ValueError, match="per_layer must be true or false"):
        li.ScoreConfig(per_layer="yes")


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("factors/factors.safetensors", "factors"),
        ("factors/manifest.json", "factors"),
        ("corpus/tokens.safetensors", "tokenized corpus"),
        ("corpus/sequences.parquet", "tokenized corpus"),
        ("run.json", "run.json is damaged"),
        ("config.yaml", "config.yaml"),
    ],
)
def test_damaged_run_files_are_named(inputs, scored, tmp_path, capsys, damage, needle):
    """A damaged file of the run directory: exit 2 with one line naming it (not a traceback, not 'the model changed')."""
    run = copy(scored, tmp_path)
    if damage.endswith((".json", ".yaml")):
        (run / damage).write_text('{"unterminated": [' if damage.endswith(".json") else "model: [unclosed\n")
    else:
        truncate(run / damage)
    err = refuses(["score", "-o", str(run), "--queries", str(inputs["queries"]), "--top", "2", "--overwrite", "-q"], capsys, needle, untouched=run)
    assert "model changed" not in err and err.count("\n") == 1


def test_environment_errors_end_in_one_line(inputs, scored, tmp_path, monkeypatch, capsys):
    """A full disk or a read-only folder (OSError) ends in one line with exit 2; so do a report --output
    that is a folder or under a file, a demo workdir that is a file, and a model without tokenizer files;
    `run` reads its queries before the fit."""
    import lminfluence.storage.atomic as atomic

    run = copy(scored, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "x"))

    monkeypatch.setattr(atomic, "atomic_write", full)
    monkeypatch.setattr(atomic, "atomic_write_text", full)
    refuses(["score", "-o", str(run), "--queries", str(inputs["queries"]), "--top", "2", "--overwrite", "-q"], capsys, "No space left on device", untouched=run / layout.SCORES_DIR)
    monkeypatch.undo()
    refuses(["report", "-o", str(run), "--output", str(tmp_path)], capsys, "Is a directory", untouched=run)
    refuses(["report", "-o", str(run), "--output", str(inputs["queries"] / "x.html")], capsys, "error:", untouched=run)
    refuses(["demo", "--workdir", str(inputs["queries"]), "--scale", "tiny", "-q"], capsys, "is a file", untouched=inputs["queries"].parent)
    bare = tmp_path / "bare-model"
    shutil.copytree(inputs["model"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    args = fit_args(inputs, tmp_path / "new")
    args[args.index("--model") + 1] = str(bare)
    refuses(args, capsys, "no usable tokenizer", untouched=tmp_path / "new")
    empty = write_jsonl(tmp_path / "q.jsonl", [{"id": "e", "prompt": "the cat", "completion": ""}])
    args = ["run", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(tmp_path / "r2"), "--queries", str(empty), "-q"]
    refuses(args, capsys, "completion is empty", untouched=tmp_path / "r2")
    assert not (tmp_path / "r2").exists()


def test_files_follow_the_umask(inputs, tmp_path):
    """Tables, factors and metadata get the mode the umask gives any new file (0644 under 022), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(fit_args(inputs, run)) == 0
        assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), "--top", "2", "-q"]) == 0
        assert main(["report", "-o", str(run), "-q"]) == 0
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file() and p.name != layout.LOCK_FILE]
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_progress_is_logged_without_a_terminal(caplog):
    """With no terminal (a pipe, nohup, a job scheduler) long passes log done/total, rate and ETA at a steady interval."""
    from lminfluence.progress import LogProgress

    bar = LogProgress(total=10, desc="fit covariance", unit="seq", interval=0.0)
    with caplog.at_level(logging.INFO, logger="lminfluence.progress"):
        bar.set_postfix_str("1,234 tok/s")
        bar.update(4)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("fit covariance: 4/10 seq (40%)") and "seq/s" in line and "1,234 tok/s" in line and "ETA" in line


def test_report_checks_its_inputs_before_writing(inputs, scored, tmp_path, capsys):
    """A damaged top.parquet or run.json, or a fitted run without scores: exit 2 with one line naming the file, and no log written."""
    run = copy(scored, tmp_path)
    truncate(run / layout.TOP_TABLE)
    err = refuses(["report", "-o", str(run)], capsys, "top.parquet is damaged", untouched=run)
    assert err.count("\n") == 1
    run = copy(scored, tmp_path / "json")
    (run / "run.json").write_text('{"unterminated": [')
    assert refuses(["report", "-o", str(run)], capsys, "run.json is damaged", untouched=run).count("\n") == 1
    fitted = tmp_path / "fitted"
    assert main(fit_args(inputs, fitted)) == 0
    refuses(["report", "-o", str(fitted)], capsys, "lminfluence score", untouched=fitted)


def test_writer_errors_that_are_not_oserrors_still_end_in_one_line(inputs, scored, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as its own error type ("… (os error 28)"): it becomes the OSError it is (exit 2)."""
    from safetensors import SafetensorError

    import lminfluence.curvature.factors as factors

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(factors, "save_file", full)
    run = tmp_path / "run"
    err = refuses(fit_args(inputs, run) + ["--strategy", "diagonal"], capsys, "No space left on device", untouched=tmp_path / "elsewhere")
    assert err.count("\n") == 1 and not (run / layout.FACTORS_DIR).exists()


def test_up_to_date_commands_take_no_lock(inputs, scored, tmp_path):
    """A command with nothing to write (scores up to date) takes no lock, so it works on a directory it may only read."""
    run = copy(scored, tmp_path)
    (run / layout.LOCK_FILE).unlink()
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), *SCORE]) == 0
    assert not (run / layout.LOCK_FILE).exists()
