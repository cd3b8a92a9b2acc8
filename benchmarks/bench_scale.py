#!/usr/bin/env python
"""Scaling out: 1 versus K CPU processes (gloo), and the factor memory of a large model.

1. Time and equality. A small float64 Llama (built from a config, random
   weights) is fitted with EK-FAC on N random sequences and Q queries are
   scored against all of them at full rank (``compute_scores``), once in one
   process (with one thread, and with K threads) and once in K processes of
   one thread each, joined in a gloo process group (``torch.multiprocessing``,
   as ``torchrun`` would). Reported: the wall time of each stage, the ratio of
   K processes to one process with K threads, and the largest relative
   difference of eigenvalues, Λ and scores from one process with one thread
   (float64: only the order of additions differs).
2. Memory (computed, nothing run): the bytes of EK-FAC factors of the MLP
   layers of Llama-3-8B's shapes (32 blocks, hidden 4096, MLP 14336, gate and
   up sharing A) for 1, 2, 4 and 8 diagonal blocks, in float32, plus what one
   rank holds of the float64 running sums during the fit; and, for
   ``Execution(factor_placement="by_layer")`` on 8 ranks, what the most and the
   least loaded rank hold (the layers assigned as ``curvature.placement.assign_owners`` does).

The block-diagonal accuracy (Pearson of scores against full factors) is
measured by ``bench_blocks.py``.

Usage::

    python benchmarks/bench_scale.py [--processes 2] [--num-train 128] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

GIB = 2**30


def model_and_data(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (args.num_train,), generator=g)
    train = [{"input_ids": torch.randint(0, 256, (int(n),), generator=g)} for n in lengths]
    queries = []
    for _ in range(args.num_queries):
        ids = torch.randint(0, 256, (12,), generator=g)
        labels = ids.clone()
        labels[:8] = -100
        queries.append({"input_ids": ids, "labels": labels})
    return model, train, queries


def fit_and_score(args, placement: str | None = None) -> dict:
    """Fit and score (on every rank when a process group is up); seconds of each stage and the results.

    ``placement``: shard the model's blocks with FSDP (``fully_shard``) and fit with this factor placement.
    """
    import lminfluence as li

    model, train, queries = model_and_data(args)
    if placement is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    ex = li.Execution(batch_size=args.batch_size, query_batch_size=args.num_queries, factor_placement=placement or "replicated")
    li.distributed.barrier()
    t0 = time.perf_counter()
    factors = li.fit_factors(model, train, execution=ex)
    li.distributed.barrier()
    t1 = time.perf_counter()
    scores = li.compute_scores(model, factors, queries, train, execution=ex)
    li.distributed.barrier()
    t2 = time.perf_counter()
    state = {k: v for k, v in factors.curvature.state_dict().items() if "::e_" in k or k.endswith("::lambda")}
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "state": state, "scores": scores.total}


def _worker(rank: int, world: int, port: int, args, out: str, placement: str | None = None) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fit_and_score(args, placement)
        if rank == 0:
            with open(Path(out) / "result.pkl", "wb") as f:
                pickle.dump(result, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_processes(args, placement: str | None = None) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        mp.start_processes(_worker, args=(args.processes, port, args, out, placement), nprocs=args.processes, join=True, start_method="spawn")
        wall = time.perf_counter() - start
        with open(Path(out) / "result.pkl", "rb") as f:
            result = pickle.load(f)
    result["wall_s"] = wall  # with process start-up and imports
    return result


def max_relative(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def factor_memory() -> dict:
    """Bytes of EK-FAC factors for Llama-3-8B's MLP layers (computed from the shapes, float32 storage)."""
    hidden, mlp, blocks_n = 4096, 14336, 32
    layers = [("gate_proj", hidden, mlp, True), ("up_proj", hidden, mlp, False), ("down_proj", mlp, hidden, True)]  # (name, I, O, holds A)
    out = {}

    def square(d: int, blocks: int) -> int:  # entries of a basis in ``blocks`` diagonal blocks
        sizes = [d // blocks + (1 if i < d % blocks else 0) for i in range(blocks)]
        return sum(s * s for s in sizes)

    for blocks in (1, 2, 4, 8):
        factors = sums = 0
        for _, i, o, holds_a in layers:
            factors += (square(o, blocks) + o + i * o + (square(i, blocks) + i if holds_a else 0)) * 4  # Q_S, e_S, Λ, (Q_A, e_A)
            sums += ((square(o, blocks) + o) // 2 + ((square(i, blocks) + i) // 2 if holds_a else 0)) * 8  # packed float64 triangles
        out[f"{blocks} block(s)"] = {"factors_gib": blocks_n * factors / GIB, "fit_sums_gib_per_rank": blocks_n * sums / GIB}
    out["by_layer, 8 ranks, 1 block"] = by_layer_memory(layers, blocks_n, 8)
    return out


def by_layer_memory(layers: list, blocks_n: int, world: int) -> dict:
    """Per-rank GiB of layer-owned factors (float32) and fit sums (float64 packed) on ``world`` ranks: the largest and smallest share."""
    import torch

    from lminfluence.hooks.collector import LayerCapture
    from lminfluence.curvature.placement import assign_owners

    captures, sizes = {}, {}
    for b in range(blocks_n):  # shapes only: tensors on the meta device; gate and up get the same ā
        shared = torch.empty(1, 1, layers[0][1], device="meta")
        for name, i, o, holds_a in layers:
            a = shared if name != "down_proj" else torch.empty(1, 1, i, device="meta")
            captures[f"{b}.{name}"] = LayerCapture(a=a, ds=torch.empty(1, 1, o, device="meta"))
            sizes[f"{b}.{name}"] = ((o * o + o + i * o + (i * i + i if holds_a else 0)) * 4, ((o * o + o) // 2 + ((i * i + i) // 2 if holds_a else 0)) * 8)
    owners = assign_owners(captures, world)
    factors, sums = [0] * world, [0] * world
    for name, r in owners.items():
        factors[r] += sizes[name][0]
        sums[r] += sizes[name][1]
    return {
        "factors_gib_per_rank_max": max(factors) / GIB,
        "factors_gib_per_rank_min": min(factors) / GIB,
        "fit_sums_gib_per_rank_max": max(sums) / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-queries", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--fsdp", action="store_true", help="also time K processes of an FSDP-sharded model, factors replicated and placed by layer")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    single = fit_and_score(args)  # the reference for equality: one thread, like each of the K processes
    torch.set_num_threads(args.processes)
    one = fit_and_score(args)  # the reference for time: one process using the K cores
    many = run_processes(args)

    def differences(got: dict) -> dict:
        diffs = {k: max_relative(v, got["state"][k]) for k, v in single["state"].items()}
        return {
            "eigenvalues": max(d for k, d in diffs.items() if "::e_" in k),
            "lambda": max(d for k, d in diffs.items() if k.endswith("::lambda")),
            "scores": max_relative(single["scores"], got["scores"]),
        }

    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "one_process": {"threads": args.processes, "fit_s": one["fit_s"], "score_s": one["score_s"]},
        "one_process_one_thread": {"fit_s": single["fit_s"], "score_s": single["score_s"]},
        "processes": {"count": args.processes, "threads_each": 1, "fit_s": many["fit_s"], "score_s": many["score_s"], "wall_with_startup_s": many["wall_s"]},
        "ratio_processes_to_one": {"fit": many["fit_s"] / one["fit_s"], "score": many["score_s"] / one["score_s"]},
        # against one process with one thread; a process with K threads differs from it by the order of
        # its float64 additions inside matrix products (eigenvalues show how close the summed covariances
        # are; EK-FAC's Λ also moves with the eigenvectors, which turn by ~1e-16 ÷ the relative gap of close eigenvalues)
        "max_relative_difference": {"processes": differences(many), f"one_process_{args.processes}_threads": differences(one)},
        "llama3_8b_mlp_factor_memory": factor_memory(),
    }
    if args.fsdp:  # rank 0's results: by_layer holds its own layers' factors only, compared key by key
        fsdp = {p: run_processes(args, p) for p in ("replicated", "by_layer")}
        result["fsdp"] = {p: {"fit_s": r["fit_s"], "score_s": r["score_s"]} for p, r in fsdp.items()}
        result["fsdp"]["by_layer_vs_one_process"] = {
            "state": max(max_relative(single["state"][k], v) for k, v in fsdp["by_layer"]["state"].items()),
            "scores": max_relative(single["scores"], fsdp["by_layer"]["scores"]),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
