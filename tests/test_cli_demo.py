"""`lminfluence demo` at the tiny scale: the whole path from the built-in corpus to the report."""

from __future__ import annotations

import json

import numpy as np

from lminfluence.cli.main import main
from lminfluence.storage import layout


def test_tiny_demo_runs_and_reuses(tmp_path, capsys):
    """The demo prints the report, two queries' top sequences and the retrieval accuracy; a rerun refits nothing."""
    args = ["demo", "--scale", "tiny", "--workdir", str(tmp_path), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "planted-fact retrieval (EK-FAC):" in out and out.count("\nquery '") == 2
    run = tmp_path / "run"
    summary = json.loads((run / "demo_summary.json").read_text())
    assert summary["fact_queries"] >= 1 and 0.0 <= summary["retrieval_accuracy"] <= 1.0
    assert all(o["mean_rank_trained"] >= 1 and o["mean_rank_flipped"] >= 1 for o in summary["word_order"])
    pairs = summary["same_query_word_order"]
    assert len(pairs) == summary["fact_queries"] and all(np.isfinite([p["statement"], p["flipped_statement"]]).all() for p in pairs)
    assert (run / layout.REPORT_FILE).is_file()
    factors = run / layout.FACTORS_DIR / layout.FACTORS_FILE
    scores = run / layout.QUERIES_TABLE
    stamps = (factors.stat().st_mtime_ns, scores.stat().st_mtime_ns)
    assert main(args) == 0
    assert (factors.stat().st_mtime_ns, scores.stat().st_mtime_ns) == stamps
