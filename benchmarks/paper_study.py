#!/usr/bin/env python
"""The paper's analyses (Grosse et al. 2023, §5) on two small pretrained models: docs/analyses.md.

1. **SmolLM2-135M-Instruct** on a mixed corpus of a few thousand training
   sequences (Jane Austen, the King James Bible, Python's documentation and
   standard-library code, from Debian packages and Python itself), with
   queries of the paper's kinds (facts from the corpus and from general
   knowledge, arithmetic, code, role-play prompts) and word-order statement
   pairs: sparsity (power-law tails, top-k % shares), spurious sequences,
   layers, word order.
2. **Gemma 3 270M** (base) on aligned multilingual text (the Bible in English
   and Spanish, verse-aligned; LibreOffice help pages in five languages,
   page-aligned), with the same question asked in each language: cross-lingual
   influence, plus the same sparsity and layer analyses.

For each model: factors fitted on a random sample of the corpus, each query's
TF-IDF candidates plus a random background scored with rank-32 query
batching, the shown sequences with per-layer and per-token scores, then
``analyze_run`` (benchmarks/study/pipeline.py). Everything lands in --out
(default runs/paper_study, git-ignored) and is reused by a rerun; the Debian
packages are fetched with ``apt-get download`` and unpacked with ``dpkg -x``
into .cache/corpora (no install). The figures (PNG) go to --figures, the
measured numbers to OUT/results.json and OUT/results.md.

Needs the model packages (see benchmarks/study/models.py for the pip lines) and
the ``gguf`` and ``dev`` extras (matplotlib comes with ``powerlaw``).

Usage::

    nice -n 5 python benchmarks/paper_study.py --models smollm2 --threads 1 &   # the whole study, the two models side by side:
    nice -n 5 python benchmarks/paper_study.py --models gemma --threads 1       # 44 and 47 min on a busy 2-core machine
    python benchmarks/paper_study.py --quick --out runs/ps-quick # toy sizes, a smoke check (a few minutes)
    python benchmarks/paper_study.py --models smollm2            # one model
    python benchmarks/paper_study.py --summary-only              # results.md and figures again from finished runs
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import corpora  # noqa: E402
from study import models  # noqa: E402
from study.corpus import mixed_documents, multilingual_documents  # noqa: E402
from study.pipeline import Sizes, run_study  # noqa: E402
from study.queries import SMOLLM2_PAIRS, SMOLLM2_QUERIES, bible_queries, capital_queries, check_queries, help_queries  # noqa: E402

# sizes measured to fit the whole study in an hour on a 2-core machine shared with other jobs, each model on one thread
# (docs/analyses.md gives the measured times and compares the sizes with the paper's)
SMOLLM2 = {"sizes": Sizes(length=64, fit=256, candidates=8, background=250, rank=32, top=4), "per_source": 900, "per_doc": 10}
# Gemma: its own aligned corpus of about 1,200 sequences (160 Bible windows in two languages, 50 help pages in five)
GEMMA = {"sizes": Sizes(length=64, fit=64, candidates=5, background=250, rank=32, top=3), "windows": 160, "pages": 50}
QUICK = {"sizes": Sizes(length=48, fit=8, candidates=3, background=24, rank=8, top=2), "per_source": 40, "per_doc": 3, "windows": 40, "pages": 6}


def smollm2_study(out: Path, cache: Path, quick: bool, memory_gib: float | None) -> dict:
    """SmolLM2 on the mixed corpus with the paper's kinds of queries and the word-order pairs; returns its study.json."""
    gguf = models.smollm2_gguf()
    model, tokenizer = models.load_gguf(gguf)
    cfg = QUICK if quick else SMOLLM2
    queries, pairs = SMOLLM2_QUERIES, SMOLLM2_PAIRS
    if quick:
        queries = [q for q in queries if q["id"] in ("capital-france", "kjv-genesis", "add", "code-add", "switch-off", "py-def")]
        pairs = [p for p in pairs if p["query_id"] in {q["id"] for q in queries}]
    check_queries(queries, pairs)
    docs, sources = mixed_documents(tokenizer, cache, cfg["per_source"], cfg["sizes"].length, cfg["per_doc"], seed=cfg["sizes"].seed)
    logging.info("smollm2: %d documents from %s", len(docs), ", ".join(sources))
    data = run_study("smollm2", out / "smollm2", gguf, model, tokenizer, docs, queries, pairs, cfg["sizes"], memory_gib)
    data["sources"] = sources
    return data


def gemma_study(out: Path, cache: Path, quick: bool, memory_gib: float | None) -> dict:
    """Gemma 3 on the aligned multilingual corpus with translated query groups; returns its study.json."""
    gguf = models.gemma_gguf()
    model, tokenizer = models.load_gguf(gguf)
    cfg = QUICK if quick else GEMMA
    docs, extra = multilingual_documents(tokenizer, cache, cfg["windows"], cfg["pages"], cfg["sizes"].length, seed=cfg["sizes"].seed)
    queries = []
    if extra["verses"]:
        queries += bible_queries(extra["verses"])
    if len(extra["paragraphs"]) == 5:
        queries += help_queries(extra["paragraphs"])
    queries += capital_queries()
    if quick:
        queries = [q for q in queries if q["group"] in ("Gen.1.1", "capital-france")][:5]
    elif cfg.get("groups"):
        queries = [q for q in queries if q["group"] in cfg["groups"]]
    check_queries(queries)
    logging.info("gemma: %d documents from %s", len(docs), ", ".join(extra["sources"]))
    data = run_study("gemma", out / "gemma", gguf, model, tokenizer, docs, queries, [], cfg["sizes"], memory_gib)
    data["sources"] = extra["sources"]
    return data


def main(argv: list[str] | None = None) -> int:
    """Run the studies asked for, then write OUT/results.{json,md} and the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "paper_study")
    p.add_argument("--cache", type=Path, default=corpora.DEFAULT_CACHE, help="where the Debian packages are unpacked")
    p.add_argument("--figures", type=Path, default=None, help="folder for the PNG figures (default OUT/figures)")
    p.add_argument("--models", nargs="+", choices=("smollm2", "gemma"), default=["smollm2", "gemma"])
    p.add_argument("--quick", action="store_true", help="toy sizes: checks that everything runs")
    p.add_argument("--memory-gib", type=float, default=8.0, help="memory budget for the library's batch sizes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--summary-only", action="store_true", help="only rewrite results and figures from the models' finished run directories")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lminfluence", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    studies = {"smollm2": smollm2_study, "gemma": gemma_study}
    results, t0 = {}, time.perf_counter()
    for name in args.models if not args.summary_only else ():
        t = time.perf_counter()
        results[name] = studies[name](args.out, args.cache, args.quick, args.memory_gib)
        results[name]["wall_seconds"] = round(time.perf_counter() - t, 1)
        study_json = args.out / name / "study.json"  # the summary reads each model's wall time from there
        kept = {**json.loads(study_json.read_text()), "wall_seconds": results[name]["wall_seconds"], "sources": results[name].get("sources")}
        study_json.write_text(json.dumps(kept, indent=1, default=str))
        logging.info("%s: done in %.1f min", name, (time.perf_counter() - t) / 60)
    from study.summary import write_summary

    figures = args.figures or args.out / "figures"
    summary = write_summary(args.out, list(results) or args.models, figures, quick=args.quick)
    summary["driver_seconds"] = round(time.perf_counter() - t0, 1)  # this invocation; each model's own time is in models.<name>.wall_seconds
    summary["load_average_end"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print((args.out / "results.md").read_text())
    print(f"this run: {summary['driver_seconds'] / 60:.1f} min; results in {args.out}, figures in {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
