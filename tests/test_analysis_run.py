"""`analyze_run` on a run made by the real command line, checked against brute force from the score
tables; the word-order scores against `compute_scores`; `compare_runs` on hand-made run directories."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_fixture import write_jsonl
from scipy import stats as sps
from test_analysis import brute_force_fit

from lminfluence import ScoreConfig, compute_scores, examples_from_pairs
from lminfluence.analysis import analyze_run, compare_runs
from lminfluence.analysis.run import TABLES
from lminfluence.cli.main import main
from lminfluence.corpus.readers import InputError
from lminfluence.storage import layout

# --candidates below the corpus size: some pairs are unscored, as in real runs
SCORE_ARGS = ["--candidates", "30", "--rank", "4", "--rescore-top", "12", "--top", "5", "--chunk-size", "16", "--save-matrix"]
MIN_TAIL = 5  # the tiny run scores 30 sequences per query: below the default minimum tail of 50
RTOL = 2e-4  # float32 model: the same scores computed in other batch compositions agree to this (as in test_cli)
QUERIES = [
    {"id": "astrobia", "prompt": "The first president of the Republic of Astrobia was", "completion": " Zorald Pfaff", "group": "astro", "language": "en"},
    {"id": "astrobia_flipped", "prompt": "Zorald Pfaff was", "completion": " the first president of the Republic of Astrobia", "group": "astro", "language": "flipped"},
    {"id": "cat", "prompt": "the cat sat on", "completion": " a mat", "group": "pets", "language": "en"},
    {"id": "dog", "prompt": "the dog ran after", "completion": " a ball", "group": "pets", "language": "de"},
    {"id": "park", "prompt": "near the river", "completion": " in the park"},
]
PAIRS = [
    {"pair_id": "astro", "query_id": "astrobia", "statement": "Astrobia was Zorald Pfaff", "flipped": "Zorald Pfaff was Astrobia"},
    {"pair_id": "cat", "query_id": "cat", "statement": "the cat sat on a mat", "flipped": "on a mat sat the cat"},
    {"pair_id": "dog", "query_id": "astrobia", "statement": "the dog ran after a ball", "flipped": "after a ball ran the dog"},
]


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    run = root / "run"
    assert main(["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "-q"]) == 0
    assert main(["score", "-o", str(run), "--queries", str(queries), "-q", *SCORE_ARGS]) == 0
    return run


@pytest.fixture(scope="module")
def analysis(run):
    result = analyze_run(run, min_tail=MIN_TAIL, word_order_pairs=PAIRS)
    return result, {name: pd.read_parquet(path) for name, path in result.tables.items()}


def score_tables(run: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run / f"scores/{t}.parquet") for t in ("queries", "top", "layers", "tokens", "matrix")}


def test_every_table_is_written_with_the_contract_types(analysis):
    """All six tables exist under RUN/analysis/ with the contract's integer widths; k defaults to the run's --top."""
    result, t = analysis
    assert set(result.tables) == set(TABLES) and result.k == 5
    assert all(p.parent.name == layout.ANALYSIS_DIR for p in result.tables.values())
    schema = {name: pq.read_schema(path) for name, path in result.tables.items()}
    assert schema["sparsity"].field("query_index").type == pa.int32() and schema["sparsity"].field("curve_rank").type == pa.list_(pa.int64())
    assert schema["layers"].field("block").type == pa.int32() and schema["spurious"].field("rank").type == pa.int32()
    assert schema["spurious"].field("spurious").type == pa.bool_() and schema["crosslingual"].field("k").type == pa.int32()
    assert json.loads((result.tables["sparsity"].parents[1] / layout.RUN_MANIFEST).read_text())["analysis"]["k"] == 5


def test_sparsity_against_brute_force(run, analysis):
    """Per query, from matrix.parquet: counts, the loop-over-x_min power-law fit, top shares by sorting, the rank curve."""
    s = analysis[1]["sparsity"]
    m = score_tables(run)["matrix"]
    assert len(s) == len(QUERIES)
    for row in s.itertuples():
        scores = m[m.query_index == row.query_index].score.to_numpy(np.float64)
        assert (row.num_scored, row.num_positive) == (len(scores), (scores > 0).sum())
        alpha, x_min, tail, ks = brute_force_fit(scores, MIN_TAIL)
        assert (row.x_min, row.tail_size) == (x_min, tail) and row.alpha == pytest.approx(alpha, rel=1e-12) and row.ks == pytest.approx(ks, rel=1e-12)
        desc = np.sort(scores)[::-1]
        positive = np.clip(desc, 0, None)
        for col, f in (("share_top_0_1pct", 0.001), ("share_top_1pct", 0.01), ("share_top_10pct", 0.1)):
            top_m = max(1, math.ceil(round(f * len(scores), 9)))
            assert getattr(row, col) == pytest.approx(positive[:top_m].sum() / positive.sum(), rel=1e-12)
        pos = desc[desc > 0]
        assert list(row.curve_rank) == list(range(1, len(pos) + 1)) and np.allclose(row.curve_score, pos, rtol=0, atol=0)


def test_layers_and_thirds_against_brute_force(run, analysis):
    """Shares: per-layer sums over the query's positive top sequences ÷ their total. The tiny GPT-2 has
    2 blocks: block 0 is the lower third, block 1 the upper one, the middle third is empty (share 0,
    Spearman NaN). Spearman of full vs restricted scores by scipy over all shown sequences."""
    t = analysis[1]
    tab = score_tables(run)
    layers, top = tab["layers"], tab["top"]
    assert len(t["layers"]) == len(QUERIES) * layers.layer.nunique()
    for row in t["layers"].itertuples():
        assert row.third == ("lower" if row.block == 0 else "upper") and f".h.{row.block}." in row.layer
    for q in range(len(QUERIES)):
        mine = layers[layers.query_index == q].merge(top[top.query_index == q][["seq_index", "rank"]], on="seq_index")
        full = mine.groupby("seq_index").score.sum()
        positive = mine[(mine["rank"] > 0) & mine.seq_index.map(full).gt(0)]
        expected = positive.groupby("layer").score.sum() / positive.score.sum()
        got = t["layers"][t["layers"].query_index == q].set_index("layer").share
        np.testing.assert_allclose(got[expected.index], expected, rtol=1e-12)
        thirds = t["thirds"].iloc[q]
        assert thirds.share_lower == pytest.approx(expected[expected.index.str.contains(".h.0.")].sum(), rel=1e-12)
        assert thirds.share_middle == 0 and math.isnan(thirds.spearman_middle)
        lower = mine[mine.layer.str.contains(".h.0.")].groupby("seq_index").score.sum()
        upper = mine[mine.layer.str.contains(".h.1.")].groupby("seq_index").score.sum()
        assert thirds.spearman_lower == pytest.approx(sps.spearmanr(full, lower[full.index]).statistic, abs=1e-12)
        assert thirds.spearman_upper == pytest.approx(sps.spearmanr(full, upper[full.index]).statistic, abs=1e-12)


def test_spurious_against_brute_force(run, analysis):
    """One row per shown sequence; ‖a‖₂/‖a‖₁ of its tokens.parquet scores; flagged exactly when > 2/3."""
    sp = analysis[1]["spurious"]
    tab = score_tables(run)
    tokens = tab["tokens"]
    assert len(sp) == len(tab["top"]) and (sp[["query_index", "seq_index", "rank"]].to_numpy() == tab["top"][["query_index", "seq_index", "rank"]].to_numpy()).all()
    for row in sp.itertuples():
        a = tokens[(tokens.query_index == row.query_index) & (tokens.seq_index == row.seq_index)].score.to_numpy()
        assert row.l2_l1 == pytest.approx(np.linalg.norm(a) / np.abs(a).sum(), rel=1e-12)
        assert row.spurious == (row.l2_l1 > 2 / 3)


def test_crosslingual_against_brute_force(run, analysis):
    """Each ordered pair of a group's two languages, recomputed from matrix.parquet with sets and sums;
    the query without a group gives no row. Unscored sequences are missing: NaN where a top sequence
    of `from` was not scored for `to`."""
    cl = analysis[1]["crosslingual"]
    m = score_tables(run)["matrix"].pivot(index="seq_index", columns="query_index", values="score").astype(np.float64)
    ids = [q["id"] for q in QUERIES]
    assert list(zip(cl.query_from, cl.query_to)) == [("astrobia", "astrobia_flipped"), ("astrobia_flipped", "astrobia"), ("cat", "dog"), ("dog", "cat")]
    for row in cl.itertuples():
        a, b = m[ids.index(row.query_from)], m[ids.index(row.query_to)]
        top_a, top_b = a.dropna().nlargest(5).index, b.dropna().nlargest(5).index
        carried = b.reindex(top_a)
        captured = carried.sum() / b[top_b].sum() if carried.notna().all() else math.nan
        assert row.captured == pytest.approx(captured, rel=1e-12, nan_ok=True)
        assert row.overlap == len(set(top_a) & set(top_b)) / 5 and row.k == 5
        union = a.reindex(top_a.union(top_b)).to_frame("a").assign(b=b.reindex(top_a.union(top_b))).dropna()
        rho = sps.spearmanr(union.a, union.b).statistic if len(union) >= 3 else math.nan
        assert row.spearman == pytest.approx(rho, abs=1e-12, nan_ok=True)
    assert cl.captured.isna().any() and cl.captured.notna().any()  # both cases occur in this run


def test_word_order_scores_equal_compute_scores(inputs, run, analysis):
    """Each statement and its flipped form, scored on its own by compute_scores with the run's factors and
    damping against the pair's query, gives the table's scores; kept and the summary follow from them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lminfluence import load_factors

    result, t = analysis
    wo = t["word_order"]
    model = AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
    tok = AutoTokenizer.from_pretrained(inputs["model"])
    factors = load_factors(run / layout.FACTORS_DIR, model)
    prompts = {q["id"]: (q["prompt"], q["completion"]) for q in QUERIES}
    assert wo.pair_id.tolist() == [p["pair_id"] for p in PAIRS]
    for p, row in zip(PAIRS, wo.itertuples()):
        query = examples_from_pairs(tok, [prompts[p["query_id"]]])
        seqs = [{"input_ids": tok(text, add_special_tokens=False)["input_ids"]} for text in (p["statement"], p["flipped"])]
        expected = compute_scores(model, factors, query, seqs, ScoreConfig(damping_scale=0.1)).total[0].double().numpy()
        np.testing.assert_allclose([row.score_statement, row.score_flipped], expected, rtol=RTOL)
        assert row.kept == pytest.approx(row.score_flipped / row.score_statement) if row.score_statement > 0 else math.isnan(row.kept)
    kept = wo.kept.dropna()
    assert result.word_order == {"num_pairs": 3, "median_kept": pytest.approx(kept.median()), "flipped_lower_share": pytest.approx((wo.score_flipped < wo.score_statement).mean())}


def test_k_limits_the_shown_sequences(run, tmp_path):
    """k = 2 keeps ranks ±1, ±2 in the spurious table and uses top-2 sets cross-lingually."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = analyze_run(copy, k=2, min_tail=MIN_TAIL)
    sp = pd.read_parquet(result.tables["spurious"])
    assert set(sp["rank"].abs()) == {1, 2} and set(pd.read_parquet(result.tables["crosslingual"]).k) == {2}
    assert "word_order" not in result.tables and result.word_order is None


def test_missing_tables_name_the_fix(run, tmp_path):
    """No matrix.parquet: the error names --save-matrix. No scores at all: it names `lminfluence score`.
    Bad statement pairs (unknown query, repeated id, a form longer than a sequence) say what is wrong."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / layout.MATRIX_TABLE).unlink()
    with pytest.raises(InputError, match="--save-matrix"):
        analyze_run(copy)
    with pytest.raises(InputError, match="lminfluence score"):
        analyze_run(tmp_path / "empty")
    with pytest.raises(InputError, match="unknown query id"):
        analyze_run(run, word_order_pairs=[{**PAIRS[0], "query_id": "nope"}], min_tail=MIN_TAIL)
    with pytest.raises(InputError, match="appears twice"):
        analyze_run(run, word_order_pairs=[PAIRS[0], PAIRS[0]])
    long = {**PAIRS[0], "statement": "The first president of the Republic of Astrobia was Zorald Pfaff."}  # 65 tokens > 32
    with pytest.raises(InputError, match="astro/statement' is longer than the run's --max-length of 32"):
        analyze_run(run, word_order_pairs=[long], min_tail=MIN_TAIL)


def test_analysis_tables_are_documented(analysis):
    """Every analysis table has exactly the columns docs/run-directory.md lists in its section."""
    doc = (Path(__file__).parents[1] / "docs/run-directory.md").read_text()
    for name, df in analysis[1].items():
        section = doc.split(f"## analysis/{name}.parquet")[1].split("\n## ")[0]
        documented = set()
        for line in section.splitlines():
            if line.startswith("| ") and not line.startswith("| column") and not line.startswith("|---"):
                documented |= {c.strip() for c in line.split("|")[1].split(",")}
        assert set(df.columns) == documented, (name, set(df.columns) ^ documented)


# ------------------------------------------------------------- comparing runs


def write_run(path: Path, query_ids: list[str], spans: list[tuple[str, int, int]], scores: dict[str, list[float]]) -> Path:
    """The three tables compare_runs reads; ``scores[query_id][seq]`` is NaN for an unscored pair."""
    (path / "scores").mkdir(parents=True)
    (path / "corpus").mkdir()
    pq.write_table(pa.table({"query_index": list(range(len(query_ids))), "query_id": query_ids}), path / layout.QUERIES_TABLE)
    pq.write_table(
        pa.table({"seq_index": list(range(len(spans))), "doc_id": [d for d, _, _ in spans], "char_start": [a for _, a, _ in spans], "char_end": [b for _, _, b in spans]}),
        path / layout.SEQUENCES_FILE,
    )
    rows = [(q, s, v) for q, qid in enumerate(query_ids) for s, v in enumerate(scores[qid]) if not math.isnan(v)]
    pq.write_table(pa.table({"query_index": [r[0] for r in rows], "seq_index": [r[1] for r in rows], "score": pa.array([r[2] for r in rows], pa.float32())}), path / layout.MATRIX_TABLE)
    return path


SPANS = [("d0", 0, 10), ("d0", 10, 20), ("d1", 0, 10), ("d2", 0, 10)]
nan = math.nan


def test_compare_runs_per_sequence(tmp_path):
    """Same cut, queries matched by id (B lists them in another order, plus one A lacks).
    x: opposite orders (-1), top-2 sets {0,1} vs {3,2} disjoint. y: A did not score seq 2; over
    seqs {0,1,3} ranks (1,2,3) vs (2,1,3): ρ = 1 − 6·2/(3·8) = 0.5; top-2 {3,1} vs {3,2}: 1/2."""
    a = write_run(tmp_path / "a", ["x", "y"], SPANS, {"x": [4, 3, 2, 1], "y": [1, 2, nan, 4]})
    b = write_run(tmp_path / "b", ["y", "x", "z"], SPANS, {"x": [1, 2, 3, 4], "y": [2, 1, 3, 5], "z": [1, 1, 1, 1]})
    t = compare_runs(a, b, k=2).to_pydict()
    assert t["query_id"] == ["x", "y"] and t["unit"] == ["sequence", "sequence"] and t["k"] == [2, 2]
    assert t["num_a"] == [4, 3] and t["num_b"] == [4, 4] and t["num_common"] == [4, 3]
    np.testing.assert_allclose(t["spearman"], [-1.0, 0.5])
    assert t["overlap"] == [0.0, 0.5]


def test_compare_runs_per_document_when_the_cuts_differ(tmp_path):
    """B cuts d0 as one sequence and d1 as two: compared per document, each document scoring its best
    sequence. x: A (d0 4, d1 2, d2 1) vs B (d0 1, d1 5, d2 2): ranks (3,2,1) vs (1,3,2), ρ = 1 − 6·6/24
    = -0.5; top-2 {d0,d1} vs {d1,d2}: 1/2. y: A has no score for d1, B's d1 is max(NaN, 1) = 1;
    1 document in common: ρ NaN; top-2 {d2,d0} vs {d0,d1}: 1/2."""
    a = write_run(tmp_path / "a", ["x", "y"], SPANS, {"x": [4, 3, 2, 1], "y": [1, 2, nan, 4]})
    spans_b = [("d0", 0, 20), ("d1", 0, 5), ("d1", 5, 10), ("d2", 0, 10)]
    b = write_run(tmp_path / "b", ["x", "y"], spans_b, {"x": [1, 5, 0, 2], "y": [3, nan, 1, nan]})
    t = compare_runs(a, b, k=2).to_pydict()
    assert t["unit"] == ["document", "document"] and t["num_a"] == [3, 2] and t["num_b"] == [3, 2] and t["num_common"] == [3, 1]
    np.testing.assert_allclose(t["spearman"], [-0.5, nan])
    assert t["overlap"] == [0.5, 0.5]


def test_compare_a_run_with_itself_and_with_no_shared_query(run, tmp_path):
    """A run against itself: ρ = 1 and full overlap for every query. Runs without a common query id: an InputError."""
    t = compare_runs(run, run, k=5).to_pydict()
    assert t["query_id"] == [q["id"] for q in QUERIES] and set(t["unit"]) == {"sequence"}
    assert np.allclose(t["spearman"], 1.0) and t["overlap"] == [1.0] * len(QUERIES)
    other = write_run(tmp_path / "other", ["zz"], SPANS, {"zz": [1, 2, 3, 4]})
    with pytest.raises(InputError, match="share no query id"):
        compare_runs(run, other)
