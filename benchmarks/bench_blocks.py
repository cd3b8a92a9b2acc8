#!/usr/bin/env python
"""Accuracy cost of block-diagonal A and S (the paper's Appendix A, ``FactorConfig.blocks``).

On the demo's trained model (a 4-layer GPT-2 trained on pydoc prose with
planted facts, ``lminfluence.demo``; built once into ``.cache/demo``), EK-FAC
is fitted with A and S cut into 1, 2, 4 and 8 diagonal blocks, and every
query is scored against every training sequence. Reported per block count,
against the full matrices (1 block): the per-query Pearson and Spearman
correlation of the scores (mean and worst), the overlap of each query's top
10, the bytes of the factors and the fit time.

Usage::

    python benchmarks/bench_blocks.py [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import lminfluence as li  # noqa: E402
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))
    import lminfluence as li  # noqa: E402
from lminfluence.corpus.readers import read_documents  # noqa: E402
from lminfluence.corpus.sequences import SequenceStore  # noqa: E402
from lminfluence.demo.prepare import prepare_demo  # noqa: E402

BLOCKS = (1, 2, 4, 8)


def ranks(t: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(t, dtype=torch.float64)
    r[t.argsort()] = torch.arange(t.numel(), dtype=torch.float64)
    return r


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "demo")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    inputs = prepare_demo(args.workdir, scale="full", progress=False)
    model = AutoModelForCausalLM.from_pretrained(inputs.model_dir).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(inputs.model_dir)
    store = SequenceStore.build(read_documents(inputs.corpus_path), tokenizer, inputs.max_length, progress=False)
    train = [store[i] for i in range(len(store))]
    queries = li.examples_from_pairs(tokenizer, [(q["prompt"], q["completion"]) for q in inputs.read_queries()])
    print(f"demo model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
          f"{len(train)} training sequences, {len(queries)} queries")

    results, reference = {}, None
    for blocks in BLOCKS:
        start = time.perf_counter()
        factors = li.fit_factors(model, train, li.FactorConfig(blocks=blocks))
        seconds = time.perf_counter() - start
        scores = li.compute_scores(model, factors, queries, train).total
        if reference is None:
            reference = scores
        p = [pearson(a, b) for a, b in zip(scores, reference)]
        s = [pearson(ranks(a), ranks(b)) for a, b in zip(scores, reference)]
        top = [len(set(a.topk(10).indices.tolist()) & set(b.topk(10).indices.tolist())) / 10 for a, b in zip(scores, reference)]
        results[blocks] = {
            "pearson_mean": sum(p) / len(p), "pearson_min": min(p),
            "spearman_mean": sum(s) / len(s), "spearman_min": min(s),
            "top10_overlap_mean": sum(top) / len(top),
            "factor_bytes": factors.nbytes, "fit_seconds": seconds,
        }
    print(f"\n{'blocks':>6}  {'Pearson mean / min':>20}  {'Spearman mean / min':>20}  {'top-10 overlap':>14}  {'factors MB':>10}  {'fit s':>6}")
    for blocks, r in results.items():
        print(f"{blocks:>6}  {r['pearson_mean']:>10.4f} / {r['pearson_min']:<7.4f}  {r['spearman_mean']:>10.4f} / {r['spearman_min']:<7.4f}"
              f"  {r['top10_overlap_mean']:>14.2f}  {r['factor_bytes'] / 1e6:>10.2f}  {r['fit_seconds']:>6.1f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"blocks": results, "num_train": len(train), "num_queries": len(queries)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
