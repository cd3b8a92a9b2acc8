"""`lminfluence demo` at the tiny scale: the whole path from the built-in corpus to the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
    # the printed accuracy is the share of fact queries whose rank-1 sequence comes from a document stating the fact
    import pandas as pd

    facts = {f["id"]: set(f["doc_ids"]) for f in json.loads((tmp_path / "inputs" / "facts.json").read_text())}
    kinds = [json.loads(line) for line in (tmp_path / "inputs" / "queries.jsonl").read_text().splitlines()]
    top = pd.read_parquet(run / layout.TOP_TABLE)
    first = top[top["rank"] == 1].set_index("query_id").doc_id
    hits = [first[q["id"]] in facts[q["fact_id"]] for q in kinds if q["kind"] == "fact"]
    assert summary["fact_queries"] == len(hits) >= 1 and summary["retrieval_accuracy"] == pytest.approx(np.mean(hits))
    assert all(o["mean_rank_trained"] >= 1 and o["mean_rank_flipped"] >= 1 for o in summary["word_order"])
    pairs = summary["same_query_word_order"]
    assert len(pairs) == summary["fact_queries"] and all(np.isfinite([p["statement"], p["flipped_statement"]]).all() for p in pairs)
    assert (run / layout.REPORT_FILE).is_file()
    factors = run / layout.FACTORS_DIR / layout.FACTORS_FILE
    scores = run / layout.QUERIES_TABLE
    stamps = (factors.stat().st_mtime_ns, scores.stat().st_mtime_ns)
    assert main(args) == 0
    assert (factors.stat().st_mtime_ns, scores.stat().st_mtime_ns) == stamps


def test_demo_with_another_seed_redoes_its_run(tmp_path, capsys):
    """A new seed rebuilds the demo's model in place; the demo notices and redoes its run instead of failing."""
    assert main(["demo", "--scale", "tiny", "--workdir", str(tmp_path), "-q"]) == 0
    first = json.loads((tmp_path / "run" / layout.RUN_MANIFEST).read_text())["model"]["fingerprint"]
    assert main(["demo", "--scale", "tiny", "--seed", "1", "--workdir", str(tmp_path), "-q"]) == 0
    assert json.loads((tmp_path / "run" / layout.RUN_MANIFEST).read_text())["model"]["fingerprint"] != first
