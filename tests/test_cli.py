"""The command line end to end on a tiny on-disk model: tables against the library, resume, replay."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from lminfluence import CausalLMTask, ScoreConfig, compute_scores, examples_from_pairs, load_factors
from lminfluence.cli.main import main
from lminfluence.corpus import SequenceStore, read_documents
from lminfluence.filtering.tfidf import TfidfIndex
from lminfluence.storage import layout

SCORE_ARGS = ["--candidates", "50", "--rank", "4", "--rescore-top", "12", "--top", "5", "--chunk-size", "16", "--save-matrix"]
# float32 model: the same scores computed in other batch compositions agree to this
RTOL = 2e-4


def fit_args(inputs, run):
    return ["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "-q"]


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(fit_args(inputs, run)) == 0
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), "-q", *SCORE_ARGS]) == 0
    return run


@pytest.fixture(scope="module")
def reference(inputs, run):
    """Brute force through the library: every query against every sequence, full rank and rank 4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
    tok = AutoTokenizer.from_pretrained(inputs["model"])
    factors = load_factors(run / layout.FACTORS_DIR, model)
    store = SequenceStore.load(run)
    rows = [json.loads(line) for line in inputs["queries"].read_text().splitlines()]
    queries = examples_from_pairs(tok, [(r["prompt"], r["completion"]) for r in rows])
    full = compute_scores(model, factors, queries, list(store)).total.double().numpy()
    low = compute_scores(model, factors, queries, list(store), ScoreConfig(query_rank=4)).total.double().numpy()
    return {"model": model, "tokenizer": tok, "store": store, "queries": queries, "full": full, "low": low}


def tables(run: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run / f"scores/{t}.parquet") for t in ("queries", "top", "layers", "tokens", "matrix")}


def snapshot(path: Path):
    """Every file under ``path`` with its size and mtime: equal snapshots mean nothing was touched."""
    if not path.exists():
        return None
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def test_documented_columns(run):
    """Every table has exactly the columns docs/run-directory.md lists."""
    doc = (Path(__file__).parents[1] / "docs/run-directory.md").read_text()
    t = tables(run)
    for name, df in t.items():
        section = doc.split(f"## scores/{name}.parquet")[1].split("\n## ")[0]
        documented = set()
        for line in section.splitlines():
            if line.startswith("| ") and not line.startswith("| column") and not line.startswith("|---"):
                documented |= {c.strip() for c in line.split("|")[1].split(",")}
        assert set(df.columns) == documented, (name, set(df.columns) ^ documented)
    seqs = pd.read_parquet(run / layout.SEQUENCES_FILE)
    assert list(seqs.columns) == ["seq_index", "doc_id", "chunk", "char_start", "char_end", "num_tokens", "text"]


def test_sequences_keep_provenance(inputs, run, reference):
    """Each sequence is the document's text at its span, and its tokens decode to that text."""
    docs = {d.id: d.text for d in read_documents(inputs["corpus"])}
    seqs = pd.read_parquet(run / layout.SEQUENCES_FILE)
    store, tok = reference["store"], reference["tokenizer"]
    assert len(seqs) == len(store) > len(docs)  # long documents were cut
    for row in seqs.itertuples():
        assert row.text == docs[row.doc_id][row.char_start : row.char_end]
        assert tok.decode(store.tokens(row.seq_index).tolist()) == row.text
        assert 2 <= row.num_tokens <= 32
    # pieces of one document are consecutive and cover it without gaps
    for doc_id, group in seqs.groupby("doc_id"):
        assert list(group.chunk) == list(range(len(group)))
        assert group.char_start.iloc[0] <= len(docs[doc_id]) - len(docs[doc_id].lstrip())
        assert group.char_end.iloc[-1] == len(docs[doc_id].rstrip()) or group.char_end.iloc[-1] == len(docs[doc_id])


def test_candidates_are_the_tfidf_top_k(run, reference):
    """The scan scores exactly each query's 50 TF-IDF candidates (docs/method.md §6), with their TF-IDF scores."""
    t = tables(run)
    index = TfidfIndex.build(reference["store"].token_lists())
    ids = [list(map(int, q["input_ids"])) for q in reference["queries"]]
    _, best = index.top_k(ids, 50)
    tf = index.scores(ids)
    for q in range(len(ids)):
        scored = t["matrix"][t["matrix"].query_index == q]
        assert set(scored.seq_index) == set(best[q].tolist())
        top = t["top"][t["top"].query_index == q]
        np.testing.assert_allclose(top.tfidf, tf[q, top.seq_index], rtol=1e-6)


def test_scan_scores_equal_the_library_at_rank_4(run, reference):
    m = tables(run)["matrix"]
    np.testing.assert_allclose(m.score, reference["low"][m.query_index, m.seq_index], rtol=RTOL, atol=1e-4 * np.abs(reference["low"]).max())


def test_top_is_the_full_rank_best_of_the_rescored(run, reference):
    """Shown scores are full-rank scores, and the shown five are the best five of the re-scored twelve."""
    t, full, low = tables(run), reference["full"], reference["low"]
    m = t["matrix"]
    for q in range(full.shape[0]):
        top = t["top"][(t["top"].query_index == q) & (t["top"]["rank"] > 0)].sort_values("rank")
        np.testing.assert_allclose(top.score, full[q, top.seq_index], rtol=RTOL)
        assert np.all(np.diff(top.score) <= 1e-6 * np.abs(top.score).max())
        scan = m[m.query_index == q].sort_values(["score", "seq_index"], ascending=[False, True])
        rescored = scan.seq_index.to_numpy()[:12]
        expect = rescored[np.argsort(-full[q, rescored], kind="stable")][:5]
        assert top.seq_index.tolist() == expect.tolist()
        np.testing.assert_allclose(top.first_stage_score, low[q, top.seq_index], rtol=RTOL, atol=1e-4 * np.abs(low).max())
        bottom = t["top"][(t["top"].query_index == q) & (t["top"]["rank"] < 0)].sort_values("rank", ascending=False)
        assert 0 < len(bottom) <= 5 and (bottom.score < 0).all() and bottom.score.is_monotonic_increasing


def test_decompositions_sum_to_the_score(run):
    """Per-layer, per-block and per-token scores add up to each shown score (Eqs 30–31)."""
    t = tables(run)
    key = ["query_index", "seq_index"]
    top = t["top"].set_index(key)
    by_layer = t["layers"].groupby(key).score.sum()
    by_token = t["tokens"].groupby(key).score.sum()
    np.testing.assert_allclose(by_layer.loc[top.index], top.score, rtol=1e-6)
    np.testing.assert_allclose(by_token.loc[top.index], top.score, rtol=1e-4, atol=1e-6 * top.score.abs().max())
    np.testing.assert_allclose(top.block_scores.map(sum), top.score, rtol=1e-6)
    assert set(t["layers"].block) == {0, 1}
    # the last token predicts nothing: its score is 0 (docs/method.md §5 puts each term on the token before the prediction)
    last = t["tokens"].groupby(key).position.transform("max") == t["tokens"].position
    assert (t["tokens"][last].score == 0).all()


def test_queries_table(run, reference):
    """log p(completion | prompt) is the model's, and the histogram counts every scored sequence."""
    t = tables(run)["queries"]
    task = CausalLMTask()
    batch = task.collate(reference["queries"])
    with torch.no_grad():
        logp = task.measurement(task.forward(reference["model"], batch), batch).double().numpy()
    np.testing.assert_allclose(t.logp, logp, rtol=1e-5)
    assert (t.num_scored == 50).all()
    assert all(sum(c) == 50 and len(e) == len(c) + 1 for c, e in zip(t.hist_counts, t.hist_edges))


def test_rerun_reuses_and_replay_reproduces(inputs, run, tmp_path):
    """A second identical command recomputes nothing; `run --config` of the saved config reproduces the scores."""
    before = snapshot(run / layout.SCORES_DIR)
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), "-q", *SCORE_ARGS]) == 0
    assert snapshot(run / layout.SCORES_DIR) == before
    replay = tmp_path / "replay"
    assert main(["run", "--config", str(run / layout.RUN_CONFIG), "--run-dir", str(replay), "-q"]) == 0
    a, b = tables(run)["top"], tables(replay)["top"]
    assert a.seq_index.tolist() == b.seq_index.tolist()
    np.testing.assert_allclose(a.score, b.score, rtol=1e-6)
    assert (replay / layout.REPORT_FILE).is_file()


def unscored_copy_interrupted(run: Path, tmp_path: Path, monkeypatch) -> tuple[Path, list, Any]:
    """A copy of ``run`` without its scores, whose next scoring is interrupted (Ctrl-C) at its 3rd scoring pass.

    Returns the copy, the list of passes made (one item each) and the real ``score_preconditioned``.
    """
    import lminfluence.scoring.two_stage as scoring

    other = tmp_path / "run"
    shutil.copytree(run, other)
    shutil.rmtree(other / layout.SCORES_DIR)
    (other / layout.RUN_MANIFEST).write_text(json.dumps({k: v for k, v in json.loads((run / layout.RUN_MANIFEST).read_text()).items() if k != "score"}))
    real = scoring.score_preconditioned
    calls: list = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_preconditioned", flaky)
    return other, calls, real


def test_resume_after_interruption(inputs, run, tmp_path, monkeypatch):
    """A scan killed half-way resumes from its saved chunks and gives the uninterrupted result."""
    import lminfluence.scoring.two_stage as scoring

    other, calls, real = unscored_copy_interrupted(run, tmp_path, monkeypatch)
    args = ["score", "-o", str(other), "--queries", str(inputs["queries"]), "-q", *SCORE_ARGS]
    assert main(args) == 130
    assert not (other / layout.QUERIES_TABLE).exists()
    assert len(list((other / layout.PARTIAL_DIR).glob("scan-*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(scoring, "score_preconditioned", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(args) == 0
    chunks = -(-len(pd.read_parquet(run / layout.MATRIX_TABLE).seq_index.unique()) // 16)
    assert len(calls) == chunks - 2 + 1  # the rest of the scan and one re-score (the details have a batched pass of their own)
    a, b = tables(run)["top"], tables(other)["top"]
    assert a.seq_index.tolist() == b.seq_index.tolist()
    np.testing.assert_allclose(a.score, b.score, rtol=1e-6)
    assert not (other / layout.PARTIAL_DIR).exists()


def test_console_script(inputs, tmp_path):
    """The installed `lminfluence` command runs, and bad input ends in one line, not a traceback."""
    exe = Path(sys.executable).with_name("lminfluence")
    out = subprocess.run([str(exe), "fit", "--model", str(inputs["model"]), "--corpus", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "nope.jsonl does not exist" in out.stderr and "Traceback" not in out.stderr


def test_lissa_through_the_cli(inputs, tmp_path, capsys):
    """LiSSA factors get their training data back from the run; a divergent scale is an error, not numbers."""
    run = tmp_path / "run"
    base = fit_args(inputs, run) + ["--strategy", "lissa", "--lissa-depth", "30", "--lissa-batch-size", "16"]
    assert main(base) == 0
    assert main(["score", "-o", str(run), "--queries", str(inputs["queries"]), "--top", "3", "--damping", "1.0", "-q"]) == 0
    top = pd.read_parquet(run / layout.TOP_TABLE)
    assert len(top) > 0 and np.isfinite(top.score).all()
    bad = tmp_path / "bad"
    assert main(fit_args(inputs, bad) + ["--strategy", "lissa", "--lissa-scale", "1e6", "--lissa-depth", "30"]) == 0
    assert main(["score", "-o", str(bad), "--queries", str(inputs["queries"]), "--damping", "1.0", "-q"]) == 1
    assert "lissa" in capsys.readouterr().err.lower()
    assert not (bad / layout.QUERIES_TABLE).exists()


def test_yaml_config_with_flag_overrides(inputs, tmp_path):
    """Options come from --config; a flag beats the file; the resolved config is saved with absolute paths."""
    import yaml

    cfg = tmp_path / "my.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "from-yaml"),
                "model": {"path": str(inputs["model"])},
                "corpus": {"path": str(inputs["corpus"]), "max_length": 24},
                "fit": {"strategy": "ekfac", "batch_size": 4},
            }
        )
    )
    assert main(["fit", "--config", str(cfg), "--strategy", "kfac", "-q"]) == 0
    saved = yaml.safe_load((tmp_path / "from-yaml" / layout.RUN_CONFIG).read_text())
    assert saved["fit"]["strategy"] == "kfac" and saved["fit"]["batch_size"] == 4
    assert saved["corpus"]["max_length"] == 24 and Path(saved["corpus"]["path"]).is_absolute()
    assert pd.read_parquet(tmp_path / "from-yaml" / layout.SEQUENCES_FILE).num_tokens.max() == 24
    assert json.loads((tmp_path / "from-yaml" / layout.FACTORS_DIR / layout.MANIFEST_FILE).read_text())["strategy"] == "kfac"


def test_changed_options_are_a_new_scoring(inputs, run, tmp_path):
    """`run` again with other score options recomputes; scores never go stale behind an unchanged file."""
    other = tmp_path / "r"
    base = ["run", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "--queries", str(inputs["queries"]), "-o", str(other), "-q"]
    assert main(base + ["--top", "4"]) == 0
    assert (pd.read_parquet(other / layout.TOP_TABLE)["rank"] > 0).sum() == 12
    assert main(base + ["--top", "2"]) == 2  # finished scores with other settings: refused ...
    assert main(base + ["--top", "2", "--overwrite"]) == 0  # ... unless asked
    assert (pd.read_parquet(other / layout.TOP_TABLE)["rank"] > 0).sum() == 6


def test_score_options_precedence(inputs, run, tmp_path):
    """Flags beat --config beat defaults; options of an earlier scoring are not carried into a new one."""
    import yaml

    other = tmp_path / "run"
    shutil.copytree(run, other)
    args = ["score", "-o", str(other), "-q", "--overwrite"]
    assert main(args + ["--queries", str(inputs["queries"]), "--rank", "4", "--damping", "0.5"]) == 0
    assert main(args + ["--damping-scale", "0.2"]) == 0  # queries fall back to the saved file
    score = yaml.safe_load((other / layout.RUN_CONFIG).read_text())["score"]
    assert score["damping"] is None and score["damping_scale"] == 0.2 and score["rank"] is None
    assert score["queries"] == str(inputs["queries"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"score": {"top": 3, "rank": 2}}))
    assert main(args + ["--config", str(cfg), "--rank", "3"]) == 0
    score = yaml.safe_load((other / layout.RUN_CONFIG).read_text())["score"]
    assert (score["top"], score["rank"]) == (3, 3)
    before = snapshot(other / layout.SCORES_DIR)
    assert main(["score", "-o", str(other), "-q"]) == 0  # bare re-run: the saved settings, up to date
    assert snapshot(other / layout.SCORES_DIR) == before


def test_shown_sequences_do_not_depend_on_query_grouping(inputs, run, tmp_path):
    """Each query's re-scored set is its own top and bottom M, whatever queries share its group."""
    tops = []
    for qbs in ("1", "3"):
        other = tmp_path / qbs
        shutil.copytree(run, other)
        assert main(["score", "-o", str(other), "--queries", str(inputs["queries"]), "--rank", "1", "--rescore-top", "3", "--top", "3", "--query-batch-size", qbs, "--overwrite", "-q"]) == 0
        tops.append(pd.read_parquet(other / layout.TOP_TABLE))
    assert tops[0].seq_index.tolist() == tops[1].seq_index.tolist()
    np.testing.assert_allclose(tops[0].score, tops[1].score, rtol=1e-5)


def test_input_edited_in_place_is_another_run(inputs, tmp_path, capsys):
    """A corpus file changed on disk is noticed; --overwrite re-tokenizes and refits."""
    corpus = tmp_path / "c.jsonl"
    shutil.copy(inputs["corpus"], corpus)
    run = tmp_path / "run"
    args = fit_args(inputs, run)
    args[args.index("--corpus") + 1] = str(corpus)
    assert main(args) == 0
    n = len(pd.read_parquet(run / layout.SEQUENCES_FILE))
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "new", "text": "a brand new document about the river and the park " * 3}) + "\n")
    before = snapshot(run)
    assert main(args) == 2
    assert "corpus changed on disk" in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(args + ["--overwrite"]) == 0
    assert len(pd.read_parquet(run / layout.SEQUENCES_FILE)) > n


def test_main_leaves_no_handlers_behind(inputs, run):
    import logging

    handlers = list(logging.getLogger("lminfluence").handlers)
    assert main(["report", "-o", str(run), "-q"]) == 0
    assert main(["report", "-o", str(run), "-q"]) == 0
    assert logging.getLogger("lminfluence").handlers == handlers
    assert (run / layout.LOG_DIR / "report.log").is_file()


def test_full_rank_scan_in_query_groups(inputs, run, reference, tmp_path):
    """Dense queries scanned one group at a time, each over its own candidates, equal the library's full-rank scores."""
    other = tmp_path / "run"
    shutil.copytree(run, other)
    args = ["score", "-o", str(other), "--queries", str(inputs["queries"]), "--candidates", "30", "--query-batch-size", "1", "--chunk-size", "7", "--save-matrix", "--overwrite", "-q"]
    assert main(args) == 0
    m = pd.read_parquet(other / layout.MATRIX_TABLE)
    assert m.groupby("query_index").size().tolist() == [30, 30, 30]
    full = reference["full"]
    np.testing.assert_allclose(m.score, full[m.query_index, m.seq_index], rtol=RTOL, atol=1e-4 * np.abs(full).max())


def test_cli_tables_equal_the_python_two_stage_procedure(run, reference):
    """`lminfluence score` is `two_stage_scores` over the run directory: the same shown sequences, ranks and scores.

    Same model, factors, sequences, queries and TF-IDF index; only the store differs (chunks on disk vs memory),
    so the shown sequences must be identical and their scores equal to float32 rounding of different batchings.
    """
    from lminfluence.scoring.two_stage import TwoStageConfig, two_stage_scores

    index = TfidfIndex.load(run / layout.TFIDF_FILE)
    result = two_stage_scores(
        reference["model"], load_factors(run / layout.FACTORS_DIR, reference["model"]), reference["queries"], reference["store"],
        ScoreConfig(query_rank=4), TwoStageConfig(candidates=50, rescore_top=12, top=5), index=index, chunk_size=16,
    )
    top = tables(run)["top"]
    for q, shown in enumerate(result.shown):
        rows = top[top.query_index == q]
        rows = pd.concat([rows[rows["rank"] > 0].sort_values("rank"), rows[rows["rank"] < 0].sort_values("rank", ascending=False)])
        assert rows.seq_index.tolist() == shown.indices.tolist()
        assert rows["rank"].tolist() == shown.ranks.tolist()
        np.testing.assert_allclose(rows.score, shown.total, rtol=RTOL, atol=1e-6 * np.abs(shown.total).max())


def test_resume_with_another_query_batch_size(inputs, run, reference, tmp_path, monkeypatch):
    """A full-rank scan interrupted with queries in groups of 2 and resumed in groups of 3 (an execution setting, so
    the same scoring) uses none of the old groups' pieces for the new groups, and shows the full-rank best."""
    import lminfluence.scoring.two_stage as scoring

    other, calls, real = unscored_copy_interrupted(run, tmp_path, monkeypatch)
    args = ["score", "-o", str(other), "--queries", str(inputs["queries"]), "-q", "--candidates", "50", "--top", "5", "--chunk-size", "16"]
    assert main([*args, "--query-batch-size", "2"]) == 130
    assert list((other / layout.PARTIAL_DIR).glob("scan-q2-*.npz"))
    monkeypatch.setattr(scoring, "score_preconditioned", real)
    assert main([*args, "--query-batch-size", "3"]) == 0
    top, full = tables(other)["top"], reference["full"]
    for q in range(full.shape[0]):
        rows = top[(top.query_index == q) & (top["rank"] > 0)].sort_values("rank")
        np.testing.assert_allclose(rows.score, full[q, rows.seq_index], rtol=RTOL, atol=1e-6 * np.abs(full[q]).max())
