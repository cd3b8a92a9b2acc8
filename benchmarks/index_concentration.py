#!/usr/bin/env python
"""Why a compressed gradient index loses fidelity: how spread a sequence's preconditioned gradient is.

A score is Σ_p x_p y_p with x = R / √(Λ + λ) a training sequence's whitened
coordinates in the EK-FAC eigenbasis (R = Q_Sᵀ DW Q_A) and y the query's.
Keeping some coordinates is exact on them and drops the rest, so the share of
Σ x² a sequence keeps measures what an eigenbasis index keeps of its scores
(exactly so for a query whose whitened coordinates are spread evenly).
Per layer this prints:

- the share of each sequence's whitened energy in its top 1, 2, 4, 8 and 20 %
  of coordinates (ranked by R² Λ / (Λ + λ)², ``eigen_topk``'s weight);
- the share of coordinates where Λ exceeds the damping, and the effective
  dimension Σ Λ² / (Λ + λ)² over O·I.

With ``--selection`` (all tracked layers in memory: the demo) it also scores
other rules for which coordinates to keep at equal count, against the exact
scores: per layer (the codec) or each sequence's top across all layers, with
the codec's weight or the whitened magnitude R² / (Λ + λ).

Usage::

    python benchmarks/index_concentration.py --model demo --workdir bench-index-work --selection
    python benchmarks/index_concentration.py --model smollm2 --sequences 2000 --max-length 32 --fit-sequences 256 \\
        --layers model.layers.0.mlp.gate_proj,model.layers.15.mlp.up_proj,model.layers.27.mlp.down_proj
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lminfluence as li  # noqa: E402
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))
    import lminfluence as li  # noqa: E402
from indexbench.setups import SETUPS, fit_or_load  # noqa: E402
from indexbench.sweep import fidelity  # noqa: E402

from lminfluence.index.codecs import LayerBasis, make_codec  # noqa: E402
from lminfluence.passes import run_pass, tracking  # noqa: E402
from lminfluence.scoring.pairwise import layer_dampings  # noqa: E402
from lminfluence.scoring.two_stage import subset  # noqa: E402
from lminfluence.task.causal_lm import CausalLMTask  # noqa: E402

SHARES = (0.01, 0.02, 0.04, 0.08, 0.2)


def rotated(model, factors, names, data, batch_size) -> dict[str, torch.Tensor]:
    """R [N, O·I] of every sequence of ``data`` for each layer of ``names``."""
    named = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with tracking(model, {n: named[n] for n in names}) as col:
        for bc in run_pass(model, CausalLMTask(), col, data, batch_size, "measurement", desc="captures"):
            for n, c in bc.captures.items():
                basis = LayerBasis.of(factors.curvature, n, c.a)
                out[n].append(basis.rotate(c.a.detach(), c.ds.detach()).reshape(c.a.shape[0], -1))
    return {n: torch.cat(v) for n, v in out.items()}


def keep_top(weight: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(weight, dtype=torch.bool)
    return mask.scatter_(1, torch.topk(weight, k, dim=1).indices, True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), default="demo")
    parser.add_argument("--workdir", type=Path, default=Path("bench-index-work"))
    parser.add_argument("--sequences", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--fit-sequences", type=int, default=512)
    parser.add_argument("--layers", default="", help="comma-separated layers (default: every tracked layer)")
    parser.add_argument("--n", type=int, default=64, help="sequences measured (with --selection: all)")
    parser.add_argument("--selection", action="store_true", help="also compare selection rules at 1/50 against exact scores")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    setup = SETUPS[args.model](args)
    factors, _ = fit_or_load(setup.model, setup.fit_data, args.workdir / f"{args.model}-factors", li.Execution(batch_size=8))
    damping = layer_dampings(factors, li.ScoreConfig())
    names = args.layers.split(",") if args.layers else list(factors.layers)
    data = setup.train if args.selection else subset(setup.train, range(min(args.n, len(setup.train))))
    r = rotated(setup.model, factors, names, data, 8)
    lam = {n: factors.curvature.state[n]["lambda"].float().reshape(-1) for n in names}
    out: dict = {"model": args.model, "description": setup.description, "sequences": len(data), "layers": {}}
    for n in names:
        scale = lam[n] + damping[n]
        x2 = r[n].square() / scale
        order = torch.argsort(r[n].square() * lam[n] / scale.square(), dim=1, descending=True)
        cum = torch.gather(x2, 1, order).cumsum(1) / x2.sum(1, keepdim=True)
        shares = cum[:, [int(f * x2.shape[1]) - 1 for f in SHARES]].mean(0).tolist()
        row = {
            "whitened_energy_in_top": {f"{100 * f:g}%": round(v, 3) for f, v in zip(SHARES, shares)},
            "lambda_above_damping": round(float((lam[n] > damping[n]).float().mean()), 3),
            "effective_dimension_over_OI": round(float((lam[n].square() / scale.square()).sum() / lam[n].numel()), 3),
        }
        out["layers"][n] = row
        print(n, row)
    if args.selection:
        out["selection_at_1/50"] = selection(r, lam, damping, setup, factors, names)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def selection(r, lam, damping, setup, factors, names) -> dict:
    """Fidelity at 1/50 (k per layer as eigen_topk's float16 codec) of four rules for which coordinates to keep."""
    queries = rotated(setup.model, factors, names, setup.queries, 16)
    m = {n: queries[n] / (lam[n] + damping[n]) for n in names}
    exact = sum(m[n] @ r[n].T for n in names).double().numpy()
    k = {n: make_codec("eigen_topk", factors.layers[n].out_dim, factors.layers[n].in_dim, 50.0, 2).k for n in names}
    weights = {
        "codec weight R²Λ/(Λ+λ)²": {n: r[n].square() * lam[n] / (lam[n] + damping[n]).square() for n in names},
        "whitened R²/(Λ+λ)": {n: r[n].square() / (lam[n] + damping[n]) for n in names},
    }
    results = {}
    for wname, w in weights.items():
        per_layer = {n: keep_top(w[n], k[n]) for n in names}
        every = torch.cat([w[n] for n in names], dim=1)
        joint = keep_top(every, sum(k.values())).split([w[n].shape[1] for n in names], dim=1)
        for rule, keep in (("per layer", per_layer), ("across layers", dict(zip(names, joint)))):
            approx = sum(m[n] @ (r[n] * keep[n]).T for n in names).double().numpy()
            f = fidelity(approx, exact)
            results[f"{rule}, {wname}"] = {"pearson": round(f["pearson"], 4), "top10": round(f["top10"], 3)}
            print(f"1/50, {rule}, {wname}: Pearson {f['pearson']:.4f}, top-10 {f['top10']:.2f}")
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
