"""`--dry-run` and the memory options on the command line: a plan before any work, nothing written, the budget honoured."""

from __future__ import annotations

import pytest

from lminfluence.cli.main import build_parser, main
from lminfluence.cli.options import given


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*")) if root.exists() else []


def test_fit_dry_run_prints_the_plan_and_writes_nothing(inputs, tmp_path, capsys):
    """A dry run names every stage's peak and the batch size it picked, and leaves no run directory behind."""
    run = tmp_path / "run"
    args = ["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fit batch size" in out and "sequences on" in out
    assert not run.exists()


def test_run_dry_run_plans_scoring_too(inputs, tmp_path, capsys):
    """`run --dry-run` reads the queries (their errors come first) and plans preconditioning and scoring as well."""
    run = tmp_path / "run"
    args = ["run", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run)]
    assert main([*args, "--queries", str(inputs["queries"]), "--fit-batch-size", "3", "--score-batch-size", "7", "--query-batch-size", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "precondition" in out and "score" in out
    assert "fit batch size 3" in out and "scoring batch size 7" in out and "query batch size 2" in out  # each stage with its own settings
    assert not run.exists()
    missing = tmp_path / "nope.jsonl"
    assert main([*args, "--queries", str(missing), "--dry-run"]) == 2
    assert not run.exists()


def test_score_dry_run_after_a_fit(inputs, tmp_path, capsys):
    """After a fit, `score --dry-run` plans with the fitted factors and leaves the run directory as it was."""
    run = tmp_path / "run"
    assert main(["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "-q"]) == 0
    before = _files(run)
    capsys.readouterr()
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), "--rank", "4", "--dry-run"]) == 0
    assert "queries against" in capsys.readouterr().out
    assert _files(run) == before


def test_memory_budget_is_one_flag_for_both_sections():
    """`run --memory-gib` sets the budget of fitting and of scoring; `fit` and `score` take it for their own section."""
    parser = build_parser()
    args = parser.parse_args(["run", "-o", "r", "--memory-gib", "3.5", "--checkpoint-seconds", "10", "--offload-factors"])
    assert given(args, "fit") == {"memory_gib": 3.5, "checkpoint_seconds": 10.0}
    assert given(args, "score") == {"memory_gib": 3.5, "offload_factors": True}
    assert given(parser.parse_args(["fit", "-o", "r", "--memory-gib", "2"]), "fit") == {"memory_gib": 2.0}


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_bad_memory_budget_exits_2_before_writing(inputs, tmp_path, value):
    """A budget that is not a positive number is refused with exit status 2 and nothing written."""
    run = tmp_path / "run"
    args = ["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "-q"]
    assert main([*args, "--memory-gib", value]) == 2
    assert not run.exists()


@pytest.mark.parametrize("dry", [True, False])
def test_impossible_budget_is_refused_before_writing(inputs, tmp_path, capsys, dry):
    """A budget below what even one sequence per batch needs is refused (exit 2), naming the budget, before any write."""
    run = tmp_path / "run"
    args = ["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "-q"]
    assert main([*args, "--memory-gib", "0.001", *(["--dry-run"] if dry else [])]) == 2
    assert "memory_gib" in capsys.readouterr().err
    assert not run.exists()


def test_execution_flags_keep_the_saved_score_settings(inputs, tmp_path):
    """`score -o RUN --memory-gib N` (an option of how it runs) repeats the saved scoring, as a bare `score -o RUN` does."""
    run = tmp_path / "run"
    assert main(["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "-q"]) == 0
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), "--rank", "4", "--top", "3", "-q"]) == 0
    assert main(["score", "-o", str(run), "--memory-gib", "8", "--score-batch-size", "5", "-q"]) == 0
