"""`lminfluence demo`: planted facts in real text, a small GPT trained on it, EK-FAC, the report.

Prints where the report is, the top sequences of two queries, the planted-fact
retrieval accuracy (how often a query's top-ranked sequence states the queried
fact) and what the flipped-order queries show (METHOD.md §7, word order).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ..storage import layout
from ..storage.atomic import atomic_write_json
from ..workflow.config import CorpusSection, FitSection, ModelSection, RunConfig, ScoreSection
from ..workflow.rundir import RunDir

REQUIRED_ACCURACY = 0.9  # the acceptance bar for the full-scale demo


def demo_config(inputs, run_dir: Path) -> RunConfig:
    return RunConfig(
        run_dir=str(run_dir),
        model=ModelSection(path=str(inputs.model_dir), dtype="float32"),
        corpus=CorpusSection(path=str(inputs.corpus_path), max_length=inputs.max_length),
        fit=FitSection(strategy="ekfac", batch_size=16),
        score=ScoreSection(queries=str(inputs.queries_path), top=10, batch_size=16, query_batch_size=32, save_matrix=True),
    )


def summarize(run_dir: Path, queries: list[dict], facts: list[dict]) -> dict:
    """Retrieval accuracy of the fact queries and the word-order comparison, from the score tables."""
    top = pd.read_parquet(run_dir / layout.TOP_TABLE)
    matrix = pd.read_parquet(run_dir / layout.MATRIX_TABLE)
    seqs = pd.read_parquet(run_dir / layout.SEQUENCES_FILE, columns=["seq_index", "doc_id"])
    doc_of = seqs.set_index("seq_index").doc_id
    docs_of_fact = {f["id"]: set(f["doc_ids"]) for f in facts}
    index_of = {q["id"]: i for i, q in enumerate(queries)}
    hits, per_fact = [], {}
    for q in queries:
        if q["kind"] != "fact":
            continue
        best = top[(top.query_id == q["id"]) & (top["rank"] == 1)]
        hit = bool(len(best)) and best.doc_id.iloc[0] in docs_of_fact[q["fact_id"]]
        hits.append(hit)
        per_fact[q["fact_id"]] = {"trained": q["id"], "hit": hit}
    for q in queries:
        if q["kind"] == "flipped" and q["fact_id"] in per_fact:
            per_fact[q["fact_id"]]["flipped"] = q["id"]

    def fact_rows(query_id: str, fact_id: str):
        rows = matrix[matrix.query_index == index_of[query_id]].sort_values("score", ascending=False).reset_index(drop=True)
        mine = rows.seq_index.map(doc_of).isin(docs_of_fact[fact_id])
        return rows, mine

    order = []
    for fact_id, entry in per_fact.items():
        if "flipped" not in entry:
            continue
        (r1, m1), (r2, m2) = fact_rows(entry["trained"], fact_id), fact_rows(entry["flipped"], fact_id)
        order.append(
            {
                "fact": fact_id,
                "mean_rank_trained": float(np.flatnonzero(m1).mean()) + 1,
                "mean_rank_flipped": float(np.flatnonzero(m2).mean()) + 1,
                "positive_share_trained": _positive_share(r1.score, m1),
                "positive_share_flipped": _positive_share(r2.score, m2),
                "top1_is_fact_flipped": bool(m2.iloc[0]),
            }
        )
    return {
        "fact_queries": len(hits),
        "retrieval_accuracy": float(np.mean(hits)) if hits else float("nan"),
        "word_order": order,
        "flipped_top1_accuracy": float(np.mean([o["top1_is_fact_flipped"] for o in order])) if order else float("nan"),
    }


def _positive_share(scores: pd.Series, mine: pd.Series) -> float:
    """The fact's sequences' share of all positive influence on a query."""
    pos = scores.clip(lower=0)
    return float(pos[mine].sum() / pos.sum()) if pos.sum() > 0 else 0.0


def same_query_word_order(run_dir: Path, config: RunConfig, queries: list[dict], facts: list[dict]) -> list[dict]:
    """The paper's word-order test: score each fact's statement and its flipped statement, as new
    sequences, against the trained-order query, so both scores are on one query's scale."""
    from ..corpus.readers import Document, Query
    from ..corpus.sequences import SequenceStore
    from ..scoring.pairwise import compute_scores
    from ..workflow.fitting import load_run_factors
    from ..workflow.model import load_model, load_tokenizer
    from ..workflow.scoring import query_examples

    trained = {q["fact_id"]: q for q in queries if q["kind"] == "fact"}
    facts = [f for f in facts if f["id"] in trained]
    if not facts:
        return []
    tokenizer, model = load_tokenizer(config.model), load_model(config.model)
    store = SequenceStore.load(run_dir)
    factors = load_run_factors(RunDir(run_dir), model, store)
    docs = [Document(f"{f['id']}/{k}", f[k]) for f in facts for k in ("statement", "flipped_statement")]
    pairs = SequenceStore.build(docs, tokenizer, config.corpus.max_length, progress=False)
    qs = [Query(trained[f["id"]]["id"], trained[f["id"]]["prompt"], trained[f["id"]]["completion"]) for f in facts]
    scores = compute_scores(model, factors, query_examples(tokenizer, qs, model), list(pairs)).total.double().numpy()
    return [{"fact": f["id"], "statement": float(scores[i, 2 * i]), "flipped_statement": float(scores[i, 2 * i + 1])} for i, f in enumerate(facts)]


def print_top(run_dir: Path, query_id: str, k: int = 3) -> None:
    q = pd.read_parquet(run_dir / layout.QUERIES_TABLE)
    row = q[q.query_id == query_id].iloc[0]
    top = pd.read_parquet(run_dir / layout.TOP_TABLE)
    top = top[(top.query_id == query_id) & (top["rank"] > 0)].sort_values("rank").head(k)
    print(f"\nquery {query_id!r}: {row.prompt!r} → {row.completion!r}   (log p = {row.logp:.2f})")
    for r in top.itertuples():
        snippet = " ".join(r.text.split())
        print(f"  #{r.rank}  {r.score:+.3g}  {r.doc_id} [{r.char_start}:{r.char_end}]")
        print(textwrap.indent(textwrap.fill(snippet[:300] + ("…" if len(snippet) > 300 else ""), 96), "      "))


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import prepare_demo
    from ..report import write_report
    from ..workflow.fitting import run_fit
    from ..workflow.scoring import run_score

    workdir = Path(args.workdir).expanduser().resolve()
    inputs = prepare_demo(workdir / "inputs", scale=args.scale, seed=args.seed, progress=not args.quiet)
    config = demo_config(inputs, workdir / "run")
    from .main import _attach_log

    _attach_log(config.run_dir, "demo")
    # the run belongs to the demo: when its inputs were rebuilt (another seed or scale), it is redone
    from ..workflow.fitting import model_stamp
    from ..workflow.rundir import file_stamp

    recorded = (RunDir(config.run_dir).manifest().get("inputs") or {}).get("fit")
    rebuilt = recorded is not None and recorded != {"corpus": file_stamp(config.corpus.path), "model": model_stamp(config.model)}
    run_dir, _ = run_fit(config, overwrite=args.overwrite or rebuilt, progress=not args.quiet)
    run_score(config, overwrite=args.overwrite or rebuilt)
    report = write_report(run_dir.path)
    queries, facts = inputs.read_queries(), inputs.read_facts()
    summary = summarize(run_dir.path, queries, facts)
    pairs = same_query_word_order(run_dir.path, config, queries, facts)
    summary["same_query_word_order"] = pairs
    if pairs:
        ratios = [p["flipped_statement"] / p["statement"] for p in pairs if p["statement"] > 0]
        summary["median_flipped_to_trained_ratio"] = float(np.median(ratios)) if ratios else float("nan")
        summary["flipped_lower_share"] = float(np.mean([p["flipped_statement"] < p["statement"] for p in pairs]))
    atomic_write_json(run_dir.path / "demo_summary.json", summary)

    fact_q = next(q["id"] for q in queries if q["kind"] == "fact")
    other = next((q["id"] for q in queries if q["kind"] == "open"), None) or next(q["id"] for q in queries if q["kind"] == "flipped")
    for qid in (fact_q, other):
        print_top(run_dir.path, qid)
    acc = summary["retrieval_accuracy"]
    print(f"\nplanted-fact retrieval (EK-FAC): {acc:.0%} of {summary['fact_queries']} fact queries rank a sequence stating the fact first")
    if summary["word_order"]:
        wo = summary["word_order"]
        print(
            "flipped word order (query 'NAME was' → the subject): the fact's sequences' mean rank goes from "
            f"{np.mean([o['mean_rank_trained'] for o in wo]):.1f} to {np.mean([o['mean_rank_flipped'] for o in wo]):.1f}, "
            f"their share of positive influence from {np.mean([o['positive_share_trained'] for o in wo]):.0%} "
            f"to {np.mean([o['positive_share_flipped'] for o in wo]):.0%}"
        )
    if summary.get("same_query_word_order"):
        print(
            "same query, statement in the flipped order as a new sequence: it scores a median "
            f"{summary['median_flipped_to_trained_ratio']:.2f}× the trained-order statement, lower for "
            f"{summary['flipped_lower_share']:.0%} of facts"
        )
    print(f"report: {report}")
    print(f"summary: {run_dir.path / 'demo_summary.json'}")
    if args.scale == "full" and not acc >= REQUIRED_ACCURACY:
        print(f"retrieval accuracy {acc:.0%} is below the demo's bar of {REQUIRED_ACCURACY:.0%}", flush=True)
        return 1
    return 0


__all__ = ["run_demo", "summarize", "demo_config"]
