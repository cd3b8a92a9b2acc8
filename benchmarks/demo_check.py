"""Does the built-in demo make its point? Planted-fact retrieval with EK-FAC, through the library API.

For each seed: build (or reuse) the full demo with ``prepare_demo``, cut the
corpus into the sequences the model was trained on, fit EK-FAC (and the
identity baseline, the plain gradient dot product), score every query, and
report

- retrieval accuracy: the share of trained-order fact queries ("<subject> was"
  → " <name>") whose top-scored training sequence is one of the documents
  stating that fact (acceptance: ≥ 90% with EK-FAC);
- the word-order effect: for the flipped queries ("<name> was" → " <subject>"),
  where the fact's documents rank and how their scores compare with the
  trained-order query's;
- the top documents of the open-ended queries on the Python text;
- timings of the build, the fit and the scoring.

    .venv/bin/python benchmarks/demo_check.py --seeds 0 1 --workdir runs/demo-check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lminfluence as li
from lminfluence.corpus import Document, SequenceStore
from lminfluence.demo import prepare_demo

BATCH = 16  # sequences per pass, for fitting and scoring


def ranks_of(scores: torch.Tensor, rows: list[int]) -> list[int]:
    """1-based rank (descending score) of each row in ``rows``."""
    order = torch.argsort(scores, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    return [int(rank[r]) for r in rows]


def evaluate(scores: torch.Tensor, queries: list[dict], facts: dict[str, dict], doc_of: list[str]) -> dict:
    """Retrieval accuracy and word-order numbers from one [Q, N] score matrix."""
    rows_of = {}
    for i, d in enumerate(doc_of):
        rows_of.setdefault(d, []).append(i)
    by_id = {q["id"]: k for k, q in enumerate(queries)}
    hits, flipped_hits, trained_ranks, flipped_ranks, ratios, trained_share, flipped_share = [], [], [], [], [], [], []
    for fid, fact in facts.items():
        rows = [r for d in fact["doc_ids"] for r in rows_of[d]]
        t = scores[by_id[f"{fid}-trained"]]
        hits.append(doc_of[int(t.argmax())] in fact["doc_ids"])
        trained_ranks.append(statistics.mean(ranks_of(t, rows)))
        trained_share.append(float(t[rows].sum() / t.clamp_min(0).sum()))
        if f"{fid}-flipped" in by_id:
            f = scores[by_id[f"{fid}-flipped"]]
            flipped_hits.append(doc_of[int(f.argmax())] in fact["doc_ids"])
            flipped_ranks.append(statistics.mean(ranks_of(f, rows)))
            ratios.append(float(f[rows].mean() / t[rows].mean()))
            flipped_share.append(float(f[rows].sum() / f.clamp_min(0).sum()))
    return {
        "accuracy": sum(hits) / len(hits),
        "mean_rank_trained": statistics.mean(trained_ranks),
        "share_trained": statistics.mean(trained_share),
        "flipped_top1": sum(flipped_hits) / max(len(flipped_hits), 1),
        "mean_rank_flipped": statistics.mean(flipped_ranks) if flipped_ranks else None,
        "share_flipped": statistics.mean(flipped_share) if flipped_share else None,
        "score_ratio_flipped_over_trained": statistics.median(ratios) if ratios else None,
    }


def paper_word_order(model, factors, tokenizer, queries: list[dict], examples: list[dict], facts: dict[str, dict]) -> dict:
    """The paper's word-order test (§5.3.2): score each fact's statement, written as a new
    sequence in the trained order and in the flipped order, against the fact's trained-order
    query. Same query, so the two scores are on one scale; the paper finds the flipped one near zero."""
    ids = [f for f in facts]
    seqs = [{"input_ids": tokenizer(facts[f]["statement"] + ".")["input_ids"]} for f in ids]
    seqs += [{"input_ids": tokenizer(facts[f]["flipped_statement"] + ".")["input_ids"]} for f in ids]
    rows = [next(k for k, q in enumerate(queries) if q["kind"] == "fact" and q["fact_id"] == f) for f in ids]
    s = li.compute_scores(model, factors, [examples[k] for k in rows], seqs, li.ScoreConfig(), execution=li.Execution(batch_size=BATCH)).total
    trained = torch.stack([s[i, i] for i in range(len(ids))])
    flipped = torch.stack([s[i, len(ids) + i] for i in range(len(ids))])
    return {
        "paper_ratio_flipped_over_trained": float((flipped / trained).median()),
        "paper_flipped_below_trained": float((flipped < trained).double().mean()),
    }


def check_seed(seed: int, workdir: Path, strategies: list[str]) -> dict:
    t0 = time.perf_counter()
    demo = prepare_demo(workdir / f"seed{seed}", scale="full", seed=seed, progress=False)
    build_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(demo.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir)
    store = SequenceStore.build([Document(r["id"], r["text"]) for r in demo.read_corpus()], tokenizer, demo.max_length, progress=False)
    train = list(store)  # the sequences `lminfluence fit` cuts
    doc_of = store.doc_id
    queries = demo.read_queries()
    examples = li.examples_from_pairs(tokenizer, [(q["prompt"], q["completion"]) for q in queries])
    facts = {f["id"]: f for f in demo.read_facts()}
    out = {"seed": seed, "build_s": build_s, "sequences": len(train), "facts_greedy": demo.read_manifest()["facts_greedy"]}
    for strategy in strategies:
        t1 = time.perf_counter()
        factors = li.fit_factors(model, train, li.FactorConfig(strategy=strategy), execution=li.Execution(batch_size=BATCH))
        t2 = time.perf_counter()
        scores = li.compute_scores(model, factors, examples, train, li.ScoreConfig(), execution=li.Execution(batch_size=BATCH))
        t3 = time.perf_counter()
        res = evaluate(scores.total, queries, facts, doc_of)
        res.update(fit_s=t2 - t1, score_s=t3 - t2)
        res.update(paper_word_order(model, factors, tokenizer, queries, examples, facts))
        if strategy == "ekfac":
            res["open_top3"] = {
                q["id"]: [doc_of[int(i)] for i in torch.argsort(scores.total[k], descending=True)[:3]]
                for k, q in enumerate(queries)
                if q["kind"] == "open"
            }
        out[strategy] = res
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo-check"))
    parser.add_argument("--strategies", nargs="+", default=["ekfac", "identity"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        r = check_seed(seed, args.workdir, args.strategies)
        results.append(r)
        print(f"seed {seed}: {r['sequences']} sequences, build {r['build_s']:.0f} s, facts greedy-correct {r['facts_greedy']:.0%}")
        for strategy in args.strategies:
            s = r[strategy]
            print(
                f"  {strategy:8s} retrieval {s['accuracy']:.0%}  mean rank of fact docs: trained {s['mean_rank_trained']:.1f}, "
                f"flipped {s['mean_rank_flipped']:.1f}  flipped top-1 {s['flipped_top1']:.0%}  "
                f"share of positive influence: trained {s['share_trained']:.1%}, flipped {s['share_flipped']:.1%}  "
                f"score ratio flipped/trained (median) {s['score_ratio_flipped_over_trained']:.3f}  "
                f"paper test: flipped/trained sequence {s['paper_ratio_flipped_over_trained']:.3f} "
                f"(flipped lower for {s['paper_flipped_below_trained']:.0%})  "
                f"fit {s['fit_s']:.0f} s, score {s['score_s']:.0f} s"
            )
        for qid, top in r["ekfac"].get("open_top3", {}).items():
            print(f"  {qid}: {', '.join(top)}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
