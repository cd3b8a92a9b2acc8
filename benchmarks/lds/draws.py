"""What label draws cost: fit seconds of K-FAC and EK-FAC against K (``FactorConfig.label_draws``).

Each round fits every (strategy, K) once, in turn, and the table keeps each
one's fastest round: on a shared machine the load drifts, and interleaving
the fits lets it slow all of them alike.
"""

from __future__ import annotations

import time
from typing import Any

import lminfluence as li

from .methods import Context, execution


def draw_costs(ctx: Context, draws: tuple[int, ...] = (1, 2, 4, 8), strategies: tuple[str, ...] = ("kfac", "ekfac"),
               rounds: int = 3) -> dict[str, Any]:
    """Fit seconds {strategy: {K: fastest of ``rounds``}} on the benchmark's model and training set."""
    best: dict[str, dict[int, float]] = {s: {} for s in strategies}
    for _ in range(rounds):
        for strategy in strategies:
            for k in draws:
                config = li.FactorConfig(strategy=strategy, modules=ctx.modules, seed=ctx.seed, label_draws=k)
                start = time.perf_counter()
                li.fit_factors(ctx.model, ctx.train, config, execution=execution(ctx))
                seconds = time.perf_counter() - start
                best[strategy][k] = min(best[strategy].get(k, seconds), seconds)
    return {"seconds": best, "rounds": rounds, "batch_size": ctx.batch_size}


def draw_cost_table(costs: dict[str, Any]) -> str:
    """Markdown: one row per K, fit seconds and the ratio to K = 1 for each strategy."""
    from accuracy.tables import markdown

    seconds = costs["seconds"]
    strategies = list(seconds)
    ks = sorted({int(k) for s in strategies for k in seconds[s]})
    rows = []
    for k in ks:
        row = [str(k)]
        for s in strategies:
            t, t1 = seconds[s][k], seconds[s][1]
            row += [f"{t:.2f}", f"{t / t1:.1f}"]
        rows.append(row)
    header = ["label draws K"] + [c for s in strategies for c in (f"{s} fit s", f"{s} / K = 1")]
    return (f"Fit seconds against label draws (fastest of {costs['rounds']} interleaved rounds, "
            f"batch {costs['batch_size']})\n\n" + markdown(header, rows))


__all__ = ["draw_costs", "draw_cost_table"]
