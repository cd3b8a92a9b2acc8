#!/usr/bin/env python
"""Retraining ground truth on a language model: the LDS of every estimator (docs/accuracy.md).

1. Corpus: the demo's text (pydoc prose, standard-library code, planted facts),
   smaller, cut into N training sequences (benchmarks/lds/corpus.py).
2. Model: the demo's GPT-2, smaller, trained from scratch on all N sequences
   (benchmarks/lds/train.py): the model every method scores.
3. Methods (benchmarks/lds/methods.py, one table): TF-IDF, the gradient dot
   product, gradient cosine, EK-FAC, LiSSA, and EK-FAC at the library's
   relative damping; each scores every training sequence for every query,
   timed. EK-FAC and LiSSA share one absolute damping λ: ``--damping-scale``
   × the mean eigenvalue of the Gauss–Newton Hessian (as the accuracy
   study), LiSSA run deep enough for its series to converge at that λ.
4. Ground truth: M random half subsets × S seeds, each retrained by the same
   recipe, f = log p(completion | prompt) of every query measured
   (``lminfluence.evaluation.build_ground_truth``: saved after every
   retraining, a killed run resumes).
5. LDS per method (Spearman over subsets between summed scores and f,
   averaged over seeds, per query), overall and per query group; how much of
   f's variation is seed noise; LiSSA and the others against the exact damped
   Gauss–Newton influence on a few queries (conjugate gradients).

Everything is cached under --out (default runs/lds-lm, git-ignored).

Usage::

    nice -n 10 python benchmarks/lds_lm.py --json runs/lds-lm.json     # the benchmark (50 min on 2 busy cores)
    python benchmarks/lds_lm.py --quick                                  # a smoke test in about a minute
    python benchmarks/lds_lm.py --methods tfidf ekfac                    # a subset of the method table
    python benchmarks/lds_lm.py --draw-costs                             # fit seconds against label draws K
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lminfluence  # noqa: E402,F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

from accuracy.study import load_tensors, pearson, save_json, save_tensors  # noqa: E402
from accuracy.tables import markdown  # noqa: E402
from lds.corpus import CorpusSpec, build_corpus  # noqa: E402
from lds.draws import draw_cost_table, draw_costs  # noqa: E402
from lds.methods import METHODS, Context, curvature_scale, exact_scores, run_method  # noqa: E402
from lds.train import ModelSpec, measure, scored_model, train_on  # noqa: E402
from lds.truth import build_truth, paired, summarize, truth_diagnostics  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How big the benchmark is (full run or --quick)."""

    corpus: CorpusSpec
    model: ModelSpec
    subsets: int
    seeds: int
    lissa_tail: float  # LiSSA depth J = ln(1/tail) · (μ_max + λ)/λ: the series' remaining error (1 - αλ)^J
    lissa_max_depth: int
    lissa_batch_size: int
    check_queries: int  # queries solved exactly to check LiSSA
    check_max_iter: int
    check_tol: float = 1e-4  # relative CG residual: far below what a correlation can see


FULL = Sizes(CorpusSpec(), ModelSpec(), subsets=50, seeds=2, lissa_tail=0.05, lissa_max_depth=2000,
             lissa_batch_size=8, check_queries=4, check_max_iter=200)
QUICK = Sizes(
    CorpusSpec(n_facts=3, docs_per_fact=(2, 3), pydoc_chars=6_000, stdlib_chars=0, vocab_size=300, n_heldout=3, prompt_words=8, completion_words=4),
    ModelSpec(n_layer=1, n_embd=16, n_head=2, epochs=2),
    subsets=6, seeds=2, lissa_tail=0.05, lissa_max_depth=50, lissa_batch_size=8, check_queries=2, check_max_iter=30,
)


def run_methods(names: list[str], ctx: Context, key: dict, out: Path) -> dict[str, dict]:
    """Each method's scores and costs, cached in ``out/methods`` (recomputed when its settings change)."""
    res = {}
    for name in names:
        method = METHODS[name]
        settings = json.loads(json.dumps({**key, "method": method.key(), "damping": ctx.damping, "lissa": ctx.lissa}))
        path = out / "methods" / f"{name}.pt"
        cached = load_tensors(path)
        if cached is None or cached.get("settings") != settings:
            print(f"  {method.label} ...", end="", flush=True)
            cached = run_method(method, ctx) | {"settings": settings}
            save_tensors(path, cached)
            print(f" {cached['fit_s']:.1f} + {cached['score_s']:.1f} s", flush=True)
        res[name] = cached
    return res


def lissa_check(ctx: Context, methods: dict[str, dict], groups: np.ndarray, sizes: Sizes, out: Path) -> dict:
    """Pearson (over all N training sequences) of each method with the exact damped GN influence.

    On ``sizes.check_queries`` queries, the first ones of each group in turn.
    """
    by_group = [np.flatnonzero(groups == g) for g in sorted(set(groups.tolist()))]
    turns = [int(ids[k]) for k in range(max(map(len, by_group))) for ids in by_group if k < len(ids)]  # firsts, seconds, ...
    picked = sorted(turns[: sizes.check_queries])
    path = out / "exact.pt"
    cached = load_tensors(path)
    settings = {"damping": ctx.damping, "queries": picked, "max_iter": sizes.check_max_iter, "tol": sizes.check_tol}
    if cached is None or cached.get("settings") != settings:
        print(f"exact damped Gauss–Newton influence (CG) for queries {picked} ...", flush=True)
        cached = exact_scores(ctx, picked, sizes.check_max_iter, sizes.check_tol) | {"settings": settings}
        save_tensors(path, cached)
    exact = cached["scores"]
    per = {n: [pearson(r["scores"][i], exact[k]) for k, i in enumerate(picked)] for n, r in methods.items()}
    return {"queries": picked, "iterations": cached["iterations"], "residual": cached["residual"], "seconds": cached["seconds"],
            "pearson": per}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke test in about a minute")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--out", type=Path, default=None, help="cache and results directory (default runs/lds-lm[-quick])")
    p.add_argument("--json", type=Path, default=None, help="also write the results there")
    p.add_argument("--subsets", type=int, default=None, help="M random half subsets (default 50; quick 6)")
    p.add_argument("--seeds", type=int, default=None, help="S retrainings per subset (default 2)")
    p.add_argument("--damping-scale", type=float, default=10.0, help="λ = this × trace(G)/P (default 10)")
    p.add_argument("--vary-init", action="store_true", help="retrainings draw their initial weights from their seed too")
    p.add_argument("--no-check", action="store_true", help="skip the exact damped-GN solve that checks LiSSA")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="draws the subsets and retraining seeds")
    p.add_argument("--draw-costs", action="store_true", help="only time K-FAC/EK-FAC fits against label draws K = 1, 2, 4, 8")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    model_spec = ModelSpec(**{**asdict(sizes.model), "vary_init": args.vary_init})
    subsets, seeds = args.subsets or sizes.subsets, args.seeds or sizes.seeds
    out = args.out or Path("runs") / ("lds-lm-quick" if args.quick else "lds-lm")
    start = time.perf_counter()
    stages: dict[str, float] = {}  # seconds of each stage in this invocation (near 0 when read from the cache)

    def lap(stage: str) -> None:
        stages[stage] = time.perf_counter() - start - sum(stages.values())

    corpus = build_corpus(sizes.corpus, out / "corpus")
    model, info = scored_model(corpus, model_spec, out)
    lap("corpus and model")
    groups = corpus.groups()
    print(f"corpus: N = {len(corpus.store)} sequences ({int(corpus.store.num_tokens.sum())} tokens), "
          f"{len(corpus.queries)} queries ({', '.join(f'{g}: {int((groups == g).sum())}' for g in sorted(set(groups)))}); "
          f"model: {info['parameters']} parameters, trained in {info['train_seconds']:.1f} s, "
          f"train loss {info['train_loss']:.2f}, query loss {json.dumps({g: round(v, 2) for g, v in info['query_loss'].items()})}", flush=True)

    ctx = Context(model=model, train=corpus.train, train_tokens=list(corpus.store.token_lists()),
                  queries=corpus.examples, query_tokens=[e["input_ids"] for e in corpus.examples],
                  modules=model_spec.modules, damping=0.0)
    key = json.loads(json.dumps({"corpus": asdict(sizes.corpus), "model": info["spec"]}))  # what every cached result depends on
    curv = load_tensors(out / "curvature.pt")
    if curv is None or curv.get("key") != key:
        curv = curvature_scale(ctx) | {"key": key}
        save_tensors(out / "curvature.pt", curv)
    lap("curvature scale")
    ctx.damping = args.damping_scale * curv["mean_eigenvalue"]
    depth = math.ceil(math.log(1 / sizes.lissa_tail) * (curv["max_eigenvalue"] + ctx.damping) / ctx.damping)
    ctx.lissa = {"lissa_depth": min(depth, sizes.lissa_max_depth), "lissa_batch_size": sizes.lissa_batch_size}
    print(f"λ = {ctx.damping:.3g} ({args.damping_scale:g} × mean eigenvalue {curv['mean_eigenvalue']:.3g}; "
          f"μ_max {curv['max_eigenvalue']:.3g}); LiSSA depth {ctx.lissa['lissa_depth']} (needed {depth}), "
          f"batch {sizes.lissa_batch_size}", flush=True)

    if args.draw_costs:
        costs = draw_costs(ctx)
        print("\n" + draw_cost_table(costs), flush=True)
        save_json(out / "draw-costs.json", costs)
        if args.json:
            save_json(args.json, costs)
        return costs

    print("methods:", flush=True)
    methods = run_methods(args.methods, ctx, key, out)
    lap("methods")

    # the retrainings belong to this corpus and recipe: their directory is named by both
    truth_key = json.loads(json.dumps({"corpus": asdict(sizes.corpus), "model": asdict(model_spec)}))
    digest = hashlib.sha256(json.dumps(truth_key, sort_keys=True).encode()).hexdigest()[:10]
    print(f"ground truth: {subsets} subsets × {seeds} seeds in {out / f'truth-{digest}'} ...", flush=True)
    truth, timing = build_truth(partial(train_on, corpus, model_spec), partial(measure, examples=corpus.examples),
                                len(corpus.store), out / f"truth-{digest}", num_subsets=subsets, seeds=seeds, seed=args.seed, report_every=10)
    lap("ground truth")
    report = {
        "setup": {"n_train": len(corpus.store), "tokens": int(corpus.store.num_tokens.sum()), "queries": corpus.queries,
                  "corpus": asdict(sizes.corpus), "model": info, "damping": ctx.damping, "damping_scale": args.damping_scale,
                  "curvature": curv, "lissa": ctx.lissa, "lissa_depth_needed": depth, "subsets": subsets, "seeds": seeds,
                  "vary_init": args.vary_init},
        "retraining": timing,
        "truth": truth_diagnostics(truth, groups),
        "lds": summarize({n: r["scores"] for n, r in methods.items()}, truth, groups),
        "cost": {n: {"fit_s": r["fit_s"], "score_s": r["score_s"], "meta": r["meta"]} for n, r in methods.items()},
    }
    if "ekfac" in report["lds"]:
        report["lds_minus_ekfac"] = paired(report["lds"], "ekfac", groups)
    if not args.no_check:
        report["check"] = lissa_check(ctx, methods, groups, sizes, out)
        lap("exact check")
    report["seconds"] = time.perf_counter() - start
    report["stages"] = stages
    report["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "load_average": list(os.getloadavg())}
    print("\n" + tables(report, subsets, seeds) + f"\n\ntotal {report['seconds']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ")", flush=True)
    save_json(out / ("results-vary-init.json" if args.vary_init else "results.json"), report)
    if args.json:
        save_json(args.json, report)
    return report


def tables(report: dict, subsets: int, seeds: int) -> str:
    """The markdown tables for docs/accuracy.md: LDS with costs, the ground truth's noise, the LiSSA check."""
    groups = [g for g in report["truth"] if g != "all"]
    ek = report["cost"].get("ekfac", {}).get("score_s")
    diff = report.get("lds_minus_ekfac", {})
    rows = []
    for name, row in report["lds"].items():
        c = report["cost"][name]
        ratio = f"{c['score_s'] / ek:.2g}" if ek else "–"
        d = diff.get(name, {}).get("all")
        delta = f"{d['mean']:+.3f} ± {d['se']:.3f}" if d and name != "ekfac" else "–"
        rows.append([METHODS[name].label] + [_pm(row[g]) for g in ["all"] + groups]
                    + [delta, f"{c['fit_s']:.2f}", f"{c['score_s']:.2f}", ratio])
    q = report["truth"]
    lds_table = (f"LDS: Spearman over {subsets} half subsets (f averaged over {seeds} seeds), mean ± std over queries\n\n"
                 + markdown(["method", f"all ({q['all']['queries']})"] + [f"{g} ({q[g]['queries']})" for g in groups]
                            + ["all − EK-FAC (paired ± SE)", "fit s", "score s", "score / EK-FAC score"], rows))
    truth_rows = [[g, f"{d['subset_sd']:.2f}", f"{d['seed_sd']:.2f}", f"{d['seed_share']:.2f}", f"{d['seed_spearman']:.2f}",
                   f"{d['ceiling']:.2f}"] for g, d in q.items()]
    rt = report["retraining"]
    truth_table = (f"Ground truth (medians over queries); retraining {rt['seconds_per_run']:.1f} s per run, {rt['runs']} runs\n\n"
                   + markdown(["queries", "sd of f over subsets", "sd of f over seeds", "seed share of variance",
                               "seed-to-seed Spearman", "LDS ceiling"], truth_rows))
    out = lds_table + "\n\n" + truth_table
    if "check" in report:
        ch = report["check"]
        rows = [[METHODS[n].label, f"{np.mean(v):.3f}", f"{np.min(v):.3f}"] for n, v in ch["pearson"].items()]
        out += (f"\n\nAgainst the exact damped Gauss–Newton influence (CG, {ch['iterations']} iterations, residual "
                f"{ch['residual']:.0e}), Pearson over all training sequences, queries {ch['queries']}\n\n"
                + markdown(["method", "mean", "min"], rows))
    return out


def _pm(cell: dict) -> str:
    return "–" if not math.isfinite(cell["mean"]) else f"{cell['mean']:.2f} ± {cell['std']:.2f}"


if __name__ == "__main__":
    main()
