"""`lminfluence demo`: planted facts in real text, a small GPT trained on it, EK-FAC, the report.

Prints where the report is, the top sequences of two queries, the planted-fact
retrieval accuracy (how often a query's top-ranked sequence states the queried
fact) and what the flipped-order queries show (docs/method.md §7, word order).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..config import Execution, FactorConfig
from ..errors import InputError
from ..scoring.two_stage import TwoStageConfig
from ..storage.atomic import atomic_write_json
from ..workflow.config import (
    CorpusSection,
    FitSection,
    ModelSection,
    RunConfig,
    ScoreFiles,
    ScoreSection,
)
from .logging import attach_log

REQUIRED_ACCURACY = 0.9  # the acceptance bar of the full-scale demo


def demo_config(inputs, run_dir: Path) -> RunConfig:
    """The demo's run: EK-FAC over its corpus and model, its queries scored with 10 sequences shown each."""
    return RunConfig(
        run_dir=str(run_dir),
        model=ModelSection(path=str(inputs.model_dir), dtype="float32"),
        corpus=CorpusSection(path=str(inputs.corpus_path), max_length=inputs.max_length),
        fit=FitSection(FactorConfig(strategy="ekfac"), Execution(batch_size=16)),
        score=ScoreSection(
            ScoreFiles(queries=str(inputs.queries_path)), stages=TwoStageConfig(top=10), execution=Execution(batch_size=16, query_batch_size=32)
        ),
    )


def run_demo(args: argparse.Namespace) -> int:
    """Build (or reuse) the demo's inputs, fit, score, analyse, report, and print what it found."""
    from ..analysis import analyze_run
    from ..demo import prepare_demo
    from ..demo.summary import print_top, read_word_order, statement_pairs, summarize
    from ..report import write_report
    from ..workflow.fitting import execute_fit, prepare_fit
    from ..workflow.scoring import execute_score, prepare_score

    workdir = Path(args.workdir).expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"demo --workdir {workdir} is a file; give a folder")
    inputs = prepare_demo(workdir / "inputs", scale=args.scale, seed=args.seed, progress=not args.quiet)
    config = demo_config(inputs, workdir / "run")
    attach_log(config.run_dir, "demo")
    # the run belongs to the demo: whatever changed (another seed or scale) is recomputed, the rest reused
    plan = prepare_fit(config, overwrite=args.overwrite, replace_changed=True)
    with plan.rd.lock():
        execute_fit(plan, progress=not args.quiet)
        score = prepare_score(config, overwrite=args.overwrite, replace_changed=True, model=plan.model, tokenizer=plan.tokenizer)
        execute_score(score)
        queries, facts = inputs.read_queries(), inputs.read_facts()
        analysis = analyze_run(plan.rd.path, word_order_pairs=statement_pairs(queries, facts), model=plan.model, tokenizer=plan.tokenizer)
        report = write_report(plan.rd.path)
        summary = summarize(plan.rd.path, queries, facts)
        if analysis.word_order:
            summary["same_query_word_order"] = read_word_order(analysis.tables["word_order"])
            summary["median_flipped_to_trained_ratio"] = analysis.word_order["median_kept"]
            summary["flipped_lower_share"] = analysis.word_order["flipped_lower_share"]
        atomic_write_json(plan.rd.path / "demo_summary.json", summary)

    fact_q = next(q["id"] for q in queries if q["kind"] == "fact")
    other = next((q["id"] for q in queries if q["kind"] == "open"), None) or next(q["id"] for q in queries if q["kind"] == "flipped")
    for qid in (fact_q, other):
        print_top(plan.rd.path, qid)
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
    print(f"summary: {plan.rd.path / 'demo_summary.json'}")
    if args.scale == "full" and not acc >= REQUIRED_ACCURACY:
        print(f"retrieval accuracy {acc:.0%} is below the demo's bar of {REQUIRED_ACCURACY:.0%}", flush=True)
        return 1
    return 0


__all__ = ["run_demo", "demo_config"]
