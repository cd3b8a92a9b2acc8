#!/usr/bin/env python
"""The accuracy study of Grosse et al. 2023 (§5.1, Figures 6 and 7), reproduced on this machine.

For each task (a regression MLP on diabetes, a classification MLP on digits,
a small character-level GPT-2 on Python's prose; see benchmarks/accuracy/):

1. train the model (SGD, batch 128, lr and weight decay picked on validation);
2. fit and score with every estimator: gradient dot product (identity),
   diagonal, K-FAC, EK-FAC and LiSSA, timed (fit + 10 queries against every
   training point);
3. compute the ground truth, the PBRF (library: lminfluence.evaluation), for
   the scored training points, and the exact damped Gauss–Newton influence by
   conjugate gradients (a diagnostic: it is what the PBRF equals to first
   order in ε);
4. report the Pearson correlation of each estimator with the PBRF over the
   training points, per query, as mean ± standard deviation over the 10
   queries; and the LDS (M random half-size subsets, several seeds) on the
   tasks where it is enabled.

Every stage is cached under --out (default runs/accuracy, git-ignored): a
rerun reuses what is there and resumes the PBRF point by point and the LDS
retraining subset by subset.

Usage::

    python benchmarks/accuracy_study.py --threads 2      # the full study (~30 minutes on 2 cores)
    python benchmarks/accuracy_study.py --quick          # ~2 minutes: toy sizes, a smoke check
    python benchmarks/accuracy_study.py --sweep          # damping sweep against the exact reference (~18 minutes)
    python benchmarks/accuracy_study.py --tasks diabetes digits --out runs/acc --json results.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lminfluence  # noqa: E402,F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

from accuracy import lds as ldsmod  # noqa: E402
from accuracy.exact import exact_influence, max_eigenvalue  # noqa: E402
from accuracy.lm import LMSpec  # noqa: E402
from accuracy.setups import TASKS, lm_setup, mlp_setup  # noqa: E402
from accuracy.study import (  # noqa: E402
    CG_STEPS,
    DRAWS,
    LABELS,
    METHODS,
    Setup,
    load_json,
    load_tensors,
    mean_gn_eigenvalue,
    mean_std,
    per_query_pearson,
    run_estimator,
    save_json,
    save_tensors,
    split_method,
)
from accuracy.tables import correlation_table, markdown, setup_table, time_table  # noqa: E402

logger = logging.getLogger("accuracy")


@dataclass
class Sizes:
    """How big each part of the study is (full run or --quick)."""

    scored: dict[str, int]  # training points compared with the PBRF
    pbrf_steps: dict[str, int]  # Adam steps per PBRF point (the solver is not monotone: see docs/accuracy.md)
    lissa_max_depth: int
    lissa_tail: float  # depth J = ln(1/tail) · (μ_max + λ)/λ, the series' remaining error (1 - αλ)^J
    lds_subsets: int
    lds_seeds: int
    lds_tasks: tuple[str, ...]
    lm: LMSpec
    mlp_epochs: dict[str, int | None] = field(default_factory=dict)


FULL = Sizes(
    scored={"diabetes": 500, "digits": 100, "lm": 100},
    pbrf_steps={"diabetes": 300, "digits": 150, "lm": 150},
    lissa_max_depth=3000,
    lissa_tail=0.05,
    lds_subsets=50,
    lds_seeds=3,
    lds_tasks=("diabetes", "digits"),
    lm=LMSpec(seq_len=24, prompt=16, n_train=128, n_val=64, n_embd=32, n_layer=1, n_head=4, steps=800, lrs=(1e-3, 3e-3), weight_decays=(0.0, 0.1)),
)
QUICK = Sizes(
    scored={"diabetes": 24, "digits": 16, "lm": 12},
    pbrf_steps={"diabetes": 60, "digits": 60, "lm": 60},
    lissa_max_depth=200,
    lissa_tail=0.05,
    lds_subsets=8,
    lds_seeds=2,
    lds_tasks=("diabetes", "digits"),
    lm=LMSpec(seq_len=16, prompt=10, n_train=32, n_val=16, n_embd=16, n_layer=1, n_head=2, steps=60, lrs=(3e-3,), weight_decays=(0.0,)),
    mlp_epochs={"diabetes": 40, "digits": 10},
)


# ------------------------------------------------------------------ stages


def build_setup(name: str, sizes: Sizes, out: Path, seed: int) -> Setup:
    if name == "lm":
        return lm_setup(out, sizes.lm, sizes.scored["lm"], lissa={}, seed=seed)
    return mlp_setup(name, out, sizes.scored[name], lissa={}, seed=seed, epochs=sizes.mlp_epochs.get(name))


def curvature_scale(setup: Setup, out: Path, damping_scale: float) -> dict:
    """λ = damping_scale × trace(G)/P (one absolute value for every layer) and μ_max of G."""
    path = out / "damping.json"
    cached = load_json(path)
    if cached and cached["damping_scale"] == damping_scale:
        return cached
    mean = mean_gn_eigenvalue(setup)
    top = max_eigenvalue(setup)
    res = {"damping_scale": damping_scale, "mean_eigenvalue": mean, "max_eigenvalue": top, "damping": damping_scale * mean}
    save_json(path, res)
    return res


def lissa_settings(setup: Setup, curv: dict, sizes: Sizes) -> dict:
    """Depth enough for the Neumann series to shrink its error to ``lissa_tail`` (capped), α automatic."""
    lam, top = curv["damping"], curv["max_eigenvalue"]
    depth = math.ceil(math.log(1 / sizes.lissa_tail) * (top + lam) / lam)
    return {"lissa_depth": int(min(depth, sizes.lissa_max_depth)), "lissa_batch_size": min(128, len(setup.train))}


def estimators(setup: Setup, methods: list[str], damping: float, out: Path) -> dict[str, dict]:
    res = {}
    for m in methods:
        path = out / f"estimator_{m}.pt"
        cached = load_tensors(path)
        if cached is None or cached.get("damping") != damping or cached.get("lissa") != (setup.lissa if m == "lissa" else None):
            logger.info("%s: fitting and scoring %s", setup.name, m)
            cached = run_estimator(setup, m, damping)
            cached.update(damping=damping, lissa=setup.lissa if m == "lissa" else None)
            save_tensors(path, cached)
        res[m] = cached
    return res


def exact_reference(setup: Setup, damping: float, out: Path) -> dict:
    path = out / "exact_gn.pt"
    cached = load_tensors(path)
    if cached is None or cached.get("damping") != damping:
        logger.info("%s: exact damped Gauss–Newton influence (CG)", setup.name)
        cached = exact_influence(setup, damping)
        cached["damping"] = damping
        save_tensors(path, cached)
    return cached


def pbrf(setup: Setup, damping: float, steps: int, out: Path) -> dict:
    """The library's PBRF for the scored points, resumable; seconds summed over the runs that computed points."""
    from lminfluence.evaluation import PBRFConfig, pbrf_influence

    cfg = PBRFConfig(epsilon=1e-3, lr=PBRF_LR, max_steps=steps, tol=1e-6, points_per_batch=8, strict=False)
    timing = load_json(out / "pbrf_time.json") or {"seconds": 0.0, "points": 0}
    start = time.perf_counter()
    result = pbrf_influence(
        setup.model, setup.train, setup.queries, setup.scored.tolist(), cfg,
        damping=damping, task=setup.task, modules=setup.modules, output_dir=out / "pbrf",
    )
    if result.computed:
        timing = {"seconds": timing["seconds"] + time.perf_counter() - start, "points": timing["points"] + len(result.computed)}
        save_json(out / "pbrf_time.json", timing)
    return {
        "influence": result.influence,
        "converged": float(result.converged.double().mean()),
        "steps": int(result.steps.max()),
        "rel_grad_median": float(result.rel_grad.median()),
        "seconds": timing["seconds"],
        "seconds_per_point": timing["seconds"] / max(timing["points"], 1),
        "config": {"epsilon": cfg.epsilon, "lr": cfg.lr, "max_steps": cfg.max_steps, "tol": cfg.tol},
    }


PBRF_LR = None  # the library's automatic Adam learning rate (0.1 × RMS of ∇L/λ, halved on stalls)


def correlations(estimates: dict[str, torch.Tensor], truth: torch.Tensor) -> dict[str, dict]:
    out = {}
    for m, est in estimates.items():
        per_q = per_query_pearson(est, truth)
        mean, std = mean_std(per_q)
        out[m] = {"mean": mean, "std": std, "per_query": per_q}
    return out


# -------------------------------------------------------------------- task


def run_task(name: str, sizes: Sizes, methods: list[str], args, root: Path) -> dict:
    out = root / name
    t0 = time.perf_counter()
    setup = build_setup(name, sizes, out, args.seed)
    curv = curvature_scale(setup, out, args.damping_scale)
    lam = curv["damping"]
    setup.lissa = lissa_settings(setup, curv, sizes)
    info = setup.info
    if name == "lm":
        quality = f"{info['test_loss']:.2f} nats/char (uniform {info['uniform_loss']:.2f})"
    elif "accuracy" in info["test"]:
        quality = f"acc {info['test']['accuracy']:.3f}, CE {info['test']['loss']:.3f} (constant {info['test_constant_loss']:.3f})"
    else:
        quality = f"½MSE {info['test']['loss']:.3f} (constant {info['test_constant_loss']:.3f})"
    res: dict = {
        "setup": {
            "n_train": len(setup.train),
            "n_scored": len(setup.scored),
            "parameters": info["parameters"],
            "quality": quality,
            "lr": info["lr"],
            "weight_decay": info["weight_decay"],
            "damping": lam,
            "curvature": curv,
            "lissa": setup.lissa,
            "info": info,
        }
    }
    print(f"\n## {name}: N = {len(setup.train)}, {info['parameters']} parameters, {quality}; "
          f"λ = {lam:.3g} (mean eigenvalue {curv['mean_eigenvalue']:.3g}, max {curv['max_eigenvalue']:.3g}), "
          f"LiSSA depth {setup.lissa['lissa_depth']}", flush=True)

    if name != "diabetes" and not args.no_draws:  # regression pseudo-gradients are exact: nothing to average
        methods = methods + [f"{m}_d{DRAWS}" for m in ("kfac", "ekfac") if m in methods]
    if "ekfac" in methods and not args.no_cg:
        methods = methods + [f"ekfac_cg{k}" for k in CG_STEPS]
        if f"ekfac_d{DRAWS}" in methods:
            methods = methods + [f"ekfac_d{DRAWS}_cg{k}" for k in CG_STEPS]
    exact = exact_reference(setup, lam, out)
    est = estimators(setup, methods, lam, out)
    res["time"] = {m: {"fit_s": r["fit_s"], "score_s": r["score_s"]} for m, r in est.items()}
    res["time"]["exact"] = {"total_s": exact["seconds"]}
    res["lissa_report"] = est["lissa"]["meta"].get("lissa") if "lissa" in est else None

    truth = pbrf(setup, lam, sizes.pbrf_steps[name], out)
    res["time"]["pbrf"] = {"total_s": truth["seconds_per_point"] * len(setup.scored)}
    cols = torch.as_tensor(setup.scored)
    scored = {m: r["scores"][:, cols] for m, r in est.items()}
    res["pearson_pbrf"] = correlations({**scored, "exact": exact["scores"][:, cols]}, truth["influence"])
    res["pearson_exact"] = correlations({m: r["scores"] for m, r in est.items()}, exact["scores"])
    res["pbrf"] = {k: v for k, v in truth.items() if k != "influence"}
    res["exact"] = {"iterations": exact["iterations"], "residual": exact["residual"]}
    print(markdown(["method", "Pearson with PBRF", "Pearson with exact GN (all N)"], [
        [LABELS.get(m, m), f"{res['pearson_pbrf'][m]['mean']:.3f} ± {res['pearson_pbrf'][m]['std']:.3f}",
         f"{res['pearson_exact'][m]['mean']:.3f} ± {res['pearson_exact'][m]['std']:.3f}" if m in res["pearson_exact"] else "–"]
        for m in list(est) + ["exact"]
    ]), flush=True)
    print(f"PBRF: {truth['converged']:.0%} of points met tol, median ‖∇J‖ ratio {truth['rel_grad_median']:.1e}, "
          f"{truth['seconds_per_point']:.1f} s per point", flush=True)

    if name in sizes.lds_tasks and not args.no_lds:
        res["lds"] = ldsmod.run_lds(setup, {m: r["scores"] for m, r in est.items()} | {"exact": exact["scores"]},
                                    sizes.lds_subsets, sizes.lds_seeds, out / "lds", args.seed)
        print(markdown(["method", "LDS (Spearman)"], [
            [LABELS.get(m, m), f"{c['mean']:.3f} ± {c['std']:.3f}"] for m, c in res["lds"]["methods"].items()
        ]), flush=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def refinement_table(results: dict[str, dict]) -> str:
    """EK-FAC + CG against EK-FAC (of the same label draws): share of the gap to the exact damped GN closed, and cost.

    Gap closed = (r_cg − r_ekfac) / (r_exact − r_ekfac) with r the mean Pearson correlation over queries; against the
    exact influence r_exact = 1, against the PBRF r_exact is the exact influence's own correlation with it.
    """
    rows = []
    for task, r in results.items():
        for m in r["time"]:
            strategy, draws, steps = split_method(m) if m not in ("exact", "pbrf") else ("", 1, None)
            if steps is None:
                continue
            base = "ekfac" if draws == 1 else f"ekfac_d{draws}"
            cells = [task, LABELS.get(m, m)]
            for key in ("pearson_exact", "pearson_pbrf"):
                top = 1.0 if key == "pearson_exact" else r[key]["exact"]["mean"]
                ek, cg = r[key][base]["mean"], r[key][m]["mean"]
                cells.append(f"{ek:.2f} → {cg:.2f} ({(cg - ek) / (top - ek):.0%})" if top > ek else f"{ek:.2f} → {cg:.2f}")
            ek_t, cg_t = r["time"][base], r["time"][m]
            cells += [f"{cg_t['score_s'] / ek_t['score_s']:.0f}",
                      f"{(cg_t['fit_s'] + cg_t['score_s']) / (ek_t['fit_s'] + ek_t['score_s']):.1f}"]
            rows.append(cells)
    header = ["task", "method", "Pearson with exact GN: EK-FAC → + CG (gap closed)", "with PBRF (gap closed)",
              "score time / EK-FAC's", "fit + score / EK-FAC's"]
    return "EK-FAC refined by conjugate gradients\n\n" + markdown(header, rows)


SWEEP_SCALES = (0.1, 1.0, 10.0, 100.0)
SWEEP_METHODS = ("identity", "diagonal", "kfac", "ekfac")
SWEEP_CG_STEPS = 1000


def damping_sweep(name: str, sizes: Sizes, args, root: Path) -> dict:
    """Pearson with the exact damped-GN influence (all training points) at several damping scales.

    No PBRF (its solves get slower as λ shrinks) and no LiSSA (its depth grows as 1/λ): the
    exact reference isolates how well each curvature approximation does at each λ.
    """
    out = root / name
    setup = build_setup(name, sizes, out, args.seed)
    curv = curvature_scale(setup, out, args.damping_scale)
    res = {}
    for scale in SWEEP_SCALES:
        lam = scale * curv["mean_eigenvalue"]
        path = out / "sweep" / f"scale_{scale:g}.pt"
        cached = load_tensors(path)
        if cached is None:
            logger.info("%s: sweep at λ = %g × mean eigenvalue", name, scale)
            exact = exact_influence(setup, lam, max_iter=SWEEP_CG_STEPS)
            block = exact_influence(setup, lam, max_iter=SWEEP_CG_STEPS, block_diagonal=True)
            cached = {"damping": lam, "iterations": exact["iterations"], "residual": exact["residual"], "pearson": {}}
            for m in SWEEP_METHODS:
                cached["pearson"][m] = correlations({m: run_estimator(setup, m, lam)["scores"]}, exact["scores"])[m]
            cached["pearson"]["block"] = correlations({"block": block["scores"]}, exact["scores"])["block"]
            save_tensors(path, cached)
        res[scale] = cached
    return res


def sweep_table(sweeps: dict[str, dict]) -> str:
    header = ["task", "λ / mean eigenvalue", "λ"] + [LABELS[m] for m in SWEEP_METHODS] + ["exact GN, block-diagonal", "CG residual"]
    rows = []
    for name, by_scale in sweeps.items():
        for scale, r in by_scale.items():
            rows.append([name, f"{scale:g}", f"{r['damping']:.3g}"]
                        + [f"{r['pearson'][m]['mean']:.2f} ± {r['pearson'][m]['std']:.2f}" for m in SWEEP_METHODS + ("block",)]
                        + [f"{r['residual']:.0e}"])
    return ("Damping sweep: Pearson with the exact damped Gauss–Newton influence, all training points "
            "(mean ± std over 10 queries)\n\n" + markdown(header, rows))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke check in minutes")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", type=Path, default=None, help="cache and results directory (default runs/accuracy[-quick])")
    p.add_argument("--json", type=Path, default=None, help="also write the results there")
    p.add_argument("--damping-scale", type=float, default=10.0, help="λ = this × trace(G)/P (default 10)")
    p.add_argument("--no-lds", action="store_true", help="skip the LDS retraining")
    p.add_argument("--no-draws", action="store_true", help=f"skip the K-FAC/EK-FAC variants fitted on {DRAWS} label draws per example")
    p.add_argument("--no-cg", action="store_true", help=f"skip EK-FAC refined by conjugate gradients (k = {CG_STEPS})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true",
                   help=f"only the damping sweep: estimators vs the exact GN influence at λ = {SWEEP_SCALES} × mean eigenvalue")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lminfluence").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    root = args.out or Path("runs") / ("accuracy-quick" if args.quick else "accuracy")
    start = time.perf_counter()
    if args.sweep:
        sweeps = {name: damping_sweep(name, sizes, args, root) for name in args.tasks}
        print("\n" + sweep_table(sweeps) + f"\n\ntotal {time.perf_counter() - start:.0f} s")
        save_json(root / "sweep.json", {n: {str(k): {kk: vv for kk, vv in v.items()} for k, v in d.items()} for n, d in sweeps.items()})
        return sweeps
    results = {}
    for name in args.tasks:
        results[name] = run_task(name, sizes, args.methods, args, root)
    total = time.perf_counter() - start
    report = {
        "tasks": results,
        "seconds": total,
        "mode": "quick" if args.quick else "full",
        "damping_scale": args.damping_scale,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
    }
    print("\n# Tables\n")
    print(setup_table(results) + "\n")
    print(correlation_table(results, "pearson_pbrf", "Pearson correlation with the PBRF (mean ± std over 10 queries)") + "\n")
    print(correlation_table(results, "pearson_exact", "Pearson correlation with the exact damped Gauss–Newton influence, all training points") + "\n")
    print(time_table(results) + "\n")
    if any(m.startswith("ekfac_cg") for r in results.values() for m in r["time"]):
        print(refinement_table(results) + "\n")
    if any("lds" in r for r in results.values()):
        print(correlation_table({t: {"lds": r["lds"]["methods"]} for t, r in results.items() if "lds" in r}, "lds",
                                "LDS: Spearman correlation with retraining (mean ± std over 10 queries)") + "\n")
    print(f"total {total:.0f} s")
    save_json(root / "results.json", report)
    if args.json:
        save_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
