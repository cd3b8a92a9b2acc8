"""The study's measured figures next to the paper's: OUT/results.json, OUT/results.md and the PNG figures.

Reads what ``run_study`` left in each model's run directory (queries.jsonl
with each query's ``kind``, study.json with the sizes and step times, and the
analysis tables under analysis/) and condenses them into the tables of
docs/analyses.md:

- sparsity: the power-law α and the top-1 % share over the queries (range and
  median), and the share of fitted queries whose α falls in the paper's range;
- layers: the mean share of the lower, middle and upper third per query kind,
  and how well each third alone ranks the shown sequences (Spearman);
- word order: per statement pair, the share of influence the flipped form keeps;
- cross-lingual: the language × language matrix of ``captured``, averaged over
  the groups that hold both languages;
- spurious: the share of shown sequences flagged by the ‖a‖₂/‖a‖₁ > 2/3 rule.

The figures: a log-log rank plot with the fitted power laws, the layer
profile per query kind, and the cross-lingual matrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lminfluence.analysis.crosslingual import pair_metrics
from lminfluence.analysis.files import load_scores, read_columns

THIRDS = ("lower", "middle", "upper")
LABELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma": "Gemma 3 270M"}

# the paper's figures (Grosse et al. 2023, models of 810M to 52B parameters), as the issue and docs/method.md §7 state them
PAPER = {
    "alpha": "≈ 2 to 4.3",
    "top1": "12 % to 52 %",
    "layers": "spread over all layers; middle layers carry the more abstract queries, lower and upper layers the token-level matches",
    "word_order": "nearly vanishes: the flipped form keeps almost none of the influence",
    "crosslingual": "influence crosses languages, more so in larger models (little in the smallest)",
    "spurious": "a filter; the paper gives no rate",
}
ALPHA_RANGE = (2.0, 4.3)
ALIASES = {"en-us": "en"}  # LibreOffice's English is the Bible's and the capital question's English in the matrix


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _stats(values: Any) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": int(v.size), "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def load_run(run_dir: Path) -> dict[str, Any]:
    """A model's queries (with kind), study.json and analysis tables (absent tables are left out)."""
    run = {"queries": [json.loads(line) for line in (run_dir / "queries.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]}
    run["study"] = json.loads((run_dir / "study.json").read_text())
    table, scores, _ = load_scores(run_dir)  # [Q, U] in queries.parquet's order
    row = {qid: i for i, qid in enumerate(table["query_id"])}
    run["scores"] = scores[[row[q["id"]] for q in run["queries"]]]  # rows in queries.jsonl's order
    run["tables"] = {}
    for name in ("sparsity", "layers", "thirds", "spurious", "crosslingual", "word_order"):
        path = run_dir / "analysis" / f"{name}.parquet"
        if path.is_file():
            run["tables"][name] = read_columns(path)
    return run


def sparsity_summary(run: dict[str, Any]) -> dict[str, Any]:
    t, kind = run["tables"]["sparsity"], {q["id"]: q["kind"] for q in run["queries"]}
    rows = [
        {"query": qid, "kind": kind[qid], "scored": int(t["num_scored"][i]), "positive": int(t["num_positive"][i]), "alpha": _finite(t["alpha"][i]),
         "x_min": _finite(t["x_min"][i]), "tail": int(t["tail_size"][i]), "ks": _finite(t["ks"][i]),
         "top0.1": _finite(t["share_top_0_1pct"][i]), "top1": _finite(t["share_top_1pct"][i]), "top10": _finite(t["share_top_10pct"][i])}
        for i, qid in enumerate(t["query_id"])
    ]  # fmt: skip
    alphas = [r["alpha"] for r in rows if r["alpha"] is not None]
    inside = sum(ALPHA_RANGE[0] <= a <= ALPHA_RANGE[1] for a in alphas)
    return {"rows": rows, "alpha": _stats(alphas), "alpha_in_paper_range": f"{inside}/{len(alphas)}", "top1": _stats([r["top1"] for r in rows]),
            "top10": _stats([r["top10"] for r in rows]), "scored": _stats([r["scored"] for r in rows])}  # fmt: skip


def thirds_by_kind(run: dict[str, Any]) -> dict[str, Any]:
    t, kind = run["tables"]["thirds"], {q["id"]: q["kind"] for q in run["queries"]}
    out: dict[str, Any] = {}
    for k in dict.fromkeys(kind[q] for q in t["query_id"]):
        mine = np.array([kind[q] == k for q in t["query_id"]])
        out[k] = {"queries": int(mine.sum())}
        for third in THIRDS:
            out[k][f"share_{third}"] = _finite(np.nanmean(t[f"share_{third}"][mine])) if np.isfinite(t[f"share_{third}"][mine]).any() else None
            out[k][f"spearman_{third}"] = _finite(np.nanmean(t[f"spearman_{third}"][mine])) if np.isfinite(t[f"spearman_{third}"][mine]).any() else None
    return out


def word_order_summary(run: dict[str, Any]) -> dict[str, Any] | None:
    t = run["tables"].get("word_order")
    if t is None:
        return None
    rows = [{"pair": p, "query": q, "statement": float(s), "flipped": float(f), "kept": _finite(k)}
            for p, q, s, f, k in zip(t["pair_id"], t["query_id"], t["score_statement"], t["score_flipped"], t["kept"])]  # fmt: skip
    kept = [r["kept"] for r in rows]
    return {"rows": rows, "kept": _stats(kept), "flipped_lower": f"{sum(r['flipped'] < r['statement'] for r in rows)}/{len(rows)}"}


def crosslingual_summary(run: dict[str, Any]) -> dict[str, Any] | None:
    t = run["tables"].get("crosslingual")
    if t is None or not len(t["group"]):
        return None
    t = {**t, "language_from": [ALIASES.get(x, x) for x in t["language_from"]], "language_to": [ALIASES.get(x, x) for x in t["language_to"]]}
    languages = list(dict.fromkeys(list(t["language_from"]) + list(t["language_to"])))
    pos = {lang: i for i, lang in enumerate(languages)}
    sums = {m: np.zeros((len(languages),) * 2) for m in ("captured", "overlap", "spearman")}
    counts = {m: np.zeros((len(languages),) * 2) for m in sums}
    by_group: dict[str, list[float]] = {}
    for i, g in enumerate(t["group"]):
        a, b = pos[t["language_from"][i]], pos[t["language_to"][i]]
        for m in sums:
            if np.isfinite(t[m][i]):
                sums[m][a, b] += t[m][i]
                counts[m][a, b] += 1
        if np.isfinite(t["captured"][i]):
            by_group.setdefault(g, []).append(float(t["captured"][i]))
    matrices = {m: np.where(counts[m] > 0, sums[m] / np.maximum(counts[m], 1), np.nan) for m in sums}
    for m in matrices:
        np.fill_diagonal(matrices[m], 1.0)
    k = int(t["k"][0])
    return {
        "languages": languages, "k": k, "controls": crosslingual_controls(run, k),
        "matrix": {m: [[_finite(x) for x in row] for row in v] for m, v in matrices.items()},
        "groups": {g: _stats(v) for g, v in by_group.items()},
        "captured": _stats([x for v in by_group.values() for x in v]),
        "overlap": _stats([float(x) for x in t["overlap"]]),
    }  # fmt: skip


def crosslingual_controls(run: dict[str, Any], k: int) -> dict[str, Any]:
    """What ``captured`` is without shared meaning: the top k of a query of *another* group, and k sequences at random.

    unrelated: captured for every ordered pair of queries of different groups
    (a sequence that is influential for any query makes this high); chance:
    k times the mean score of the ``to`` query over the pool, over its top-k sum.
    """
    scores, group = run["scores"], [q.get("group") for q in run["queries"]]
    members = [q for q, g in enumerate(group) if g is not None]
    unrelated = [pair_metrics(scores[a], scores[b], k) for a in members for b in members if group[a] != group[b]]
    chance = []
    for q in members:
        row = scores[q][np.isfinite(scores[q])]
        top = np.sort(row)[::-1][:k].sum()
        if top > 0:
            chance.append(float(k * row.mean() / top))
    return {"unrelated_captured": _stats([u[0] for u in unrelated]), "unrelated_overlap": _stats([u[1] for u in unrelated]), "chance_captured": _stats(chance)}


def group_matrices(run: dict[str, Any], min_languages: int = 3) -> dict[str, tuple[list[str], np.ndarray, int]]:
    """Group → (its languages, captured [from, to] with NaN on the diagonal, k), for groups with ``min_languages`` or more."""
    t = run["tables"].get("crosslingual")
    out: dict[str, tuple[list[str], np.ndarray, int]] = {}
    if t is None:
        return out
    for g in dict.fromkeys(t["group"]):
        rows = [i for i, x in enumerate(t["group"]) if x == g]
        langs = list(dict.fromkeys(ALIASES.get(t["language_from"][i], t["language_from"][i]) for i in rows))
        if len(langs) < min_languages:
            continue
        mat = np.full((len(langs), len(langs)), np.nan)
        for i in rows:
            mat[langs.index(ALIASES.get(t["language_from"][i], t["language_from"][i])), langs.index(ALIASES.get(t["language_to"][i], t["language_to"][i]))] = t[
                "captured"
            ][i]
        out[g] = (langs, mat, int(t["k"][rows[0]]))
    return out


def spurious_summary(run: dict[str, Any]) -> dict[str, Any]:
    t = run["tables"]["spurious"]
    flagged, rank = np.asarray(t["spurious"], bool), np.asarray(t["rank"])
    return {"shown": int(flagged.size), "flagged": int(flagged.sum()), "share": _finite(flagged.mean()) if flagged.size else None,
            "share_positive": _finite(flagged[rank > 0].mean()) if (rank > 0).any() else None,
            "share_negative": _finite(flagged[rank < 0].mean()) if (rank < 0).any() else None, "l2_l1": _stats(t["l2_l1"].tolist())}  # fmt: skip


def model_summary(run_dir: Path) -> dict[str, Any]:
    """Everything results.json keeps about one model's run directory."""
    run = load_run(run_dir)
    study = run["study"]
    scored = study["steps"]["score"]
    return {
        "sizes": study.get("sizes"), "pool": study.get("pool") or {"size": scored.get("pool"), "tokens": scored.get("tokens")}, "sources": study.get("sources"),
        "steps": {k: {"seconds": v["seconds"], "load": v.get("load")} for k, v in study["steps"].items()},
        "corpus": {k: study["steps"]["corpus"].get(k) for k in ("documents", "sequences", "tokens")},
        "fit": {k: study["steps"]["fit"].get(k) for k in ("sequences", "tokens")},
        "queries": len(run["queries"]), "kinds": sorted({q["kind"] for q in run["queries"]}),
        "sparsity": sparsity_summary(run), "thirds": thirds_by_kind(run), "word_order": word_order_summary(run),
        "crosslingual": crosslingual_summary(run), "spurious": spurious_summary(run),
    }  # fmt: skip


# ------------------------------------------------------------------ markdown


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def span(s: dict[str, Any], fmt: Any = num) -> str:
    return "no fit" if not s["n"] else f"{fmt(s['min'])} – {fmt(s['max'])} (median {fmt(s['median'])}, n = {s['n']})"


def markdown(summary: dict[str, Any]) -> str:
    """results.md: the overview table (ours next to the paper's), then per model its layer, sparsity, word-order and cross-lingual tables."""
    models = summary["models"]
    head = "| | " + " | ".join(LABELS.get(m, m) for m in models) + " | paper (810M–52B) |\n|---|" + "---|" * (len(models) + 1)
    lines = ["# Paper study: measured figures next to the paper's", "", head]
    rows = [
        (
            "sequences in the corpus / scored per query",
            lambda s: f"{s['corpus']['sequences']} / {s['sparsity']['scored']['max']:.0f}",
            "millions / 10⁴–10⁵ TF-IDF candidates",
        ),
        ("queries", lambda s: str(s["queries"]), "≈ 30"),
        ("power-law α (over queries)", lambda s: span(s["sparsity"]["alpha"]), PAPER["alpha"]),
        ("α inside 2–4.3", lambda s: s["sparsity"]["alpha_in_paper_range"], "all"),
        ("top-1 % share of positive influence", lambda s: span(s["sparsity"]["top1"], pct), PAPER["top1"]),
        ("top-10 % share", lambda s: span(s["sparsity"]["top10"], pct), "–"),
        (
            "spurious (shown sequences flagged)",
            lambda s: f"{s['spurious']['flagged']}/{s['spurious']['shown']} ({pct(s['spurious']['share'])})",
            PAPER["spurious"],
        ),
    ]
    for label, f, paper in rows:
        lines.append(f"| {label} | " + " | ".join(f(models[m]) for m in models) + f" | {paper} |")
    for m, s in models.items():
        lines += ["", f"## {LABELS.get(m, m)}: layers by query kind (mean share of the top sequences' influence)", "",
                  "| kind | queries | lower | middle | upper | ρ lower | ρ middle | ρ upper |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for kind, r in s["thirds"].items():
            lines.append(
                f"| {kind} | {r['queries']} | "
                + " | ".join(pct(r[f"share_{t}"]) for t in THIRDS)
                + " | "
                + " | ".join(num(r[f"spearman_{t}"]) for t in THIRDS)
                + " |"
            )
        lines.append(f"\nPaper: {PAPER['layers']}.")
        lines += [
            "",
            f"## {LABELS.get(m, m)}: sparsity per query",
            "",
            "| query | kind | positive/scored | α | x_min | tail | KS | top 1 % | top 10 % |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["sparsity"]["rows"]:
            x_min = "–" if r["x_min"] is None else f"{r['x_min']:.3g}"
            fit = f"{num(r['alpha'])} | {x_min} | {r['tail']} | {num(r['ks'], 3)}"
            lines.append(f"| {r['query']} | {r['kind']} | {r['positive']}/{r['scored']} | {fit} | {pct(r['top1'])} | {pct(r['top10'])} |")
        wo = s["word_order"]
        if wo:
            lines += ["", f"## {LABELS.get(m, m)}: word order (influence of the flipped form / the query's order)", "",
                      "| pair | query | score (query's order) | score (flipped) | kept |", "|---|---|---|---|---|"]  # fmt: skip
            for r in wo["rows"]:
                lines.append(f"| {r['pair']} | {r['query']} | {r['statement']:.3g} | {r['flipped']:.3g} | {pct(r['kept'])} |")
            lines.append(f"\nMedian kept {pct(wo['kept']['median'])}; flipped lower in {wo['flipped_lower']} pairs. Paper: {PAPER['word_order']}.")
        cl = s["crosslingual"]
        if cl:
            langs = cl["languages"]
            lines += ["", f"## {LABELS.get(m, m)}: cross-lingual `captured` (row: language whose top {cl['k']} is taken; column: query it is scored for)", "",
                      "| from \\ to | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]  # fmt: skip
            for i, a in enumerate(langs):
                lines.append(f"| {a} | " + " | ".join(num(x) for x in cl["matrix"]["captured"][i]) + " |")
            lines.append("\n| group | captured (pairs of languages) |\n|---|---|")
            for g, st in cl["groups"].items():
                lines.append(f"| {g} | {span(st)} |")
            c = cl["controls"]
            lines.append(f"| control: a query of another group | {span(c['unrelated_captured'])} |")
            lines.append(f"| control: {cl['k']} sequences at random | {span(c['chance_captured'])} |")
            overlap = f"{span(cl['overlap'], pct)} within groups, {span(c['unrelated_overlap'], pct)} across groups"
            lines.append(f"\nOverlap of the top {cl['k']}: {overlap}. Paper: {PAPER['crosslingual']}.")
    lines += ["", "## Sizes and time", "", "| | " + " | ".join(LABELS.get(m, m) for m in models) + " |", "|---|" + "---|" * len(models)]
    lines.append("| corpus sequences (tokens) | " + " | ".join(f"{s['corpus']['sequences']} ({s['corpus']['tokens']})" for s in models.values()) + " |")
    lines.append("| fit sequences (tokens) | " + " | ".join(f"{s['fit']['sequences']} ({s['fit']['tokens']})" for s in models.values()) + " |")
    lines.append("| pool scored per query (tokens) | " + " | ".join(f"{s['pool']['size']} ({s['pool']['tokens']})" for s in models.values()) + " |")
    for step in ("corpus", "fit", "score", "analyze", "report"):
        lines.append(f"| {step} (s) | " + " | ".join(f"{s['steps'].get(step, {}).get('seconds', '–')}" for s in models.values()) + " |")
    lines.append("| all steps (min) | " + " | ".join(f"{sum(v['seconds'] for v in s['steps'].values()) / 60:.1f}" for s in models.values()) + " |")
    walls = [f"{s['wall_seconds'] / 60:.1f}" if s.get("wall_seconds") else "–" for s in models.values()]
    lines.append("| wall, model load included (min) | " + " | ".join(walls) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- figures


def figures(out: Path, names: list[str], folder: Path) -> list[Path]:
    """The three PNGs (rank plot, layer profile, cross-lingual matrix); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    runs = {m: load_run(out / m) for m in names}
    written = []

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (m, run) in zip(axes[0], runs.items()):
        t = run["tables"]["sparsity"]
        fitted = [i for i in np.argsort(-np.asarray(t["tail_size"])) if np.isfinite(t["alpha"][i])][:4] or list(range(min(4, len(t["query_id"]))))
        for n, i in enumerate(fitted):
            ranks, scores = np.asarray(t["curve_rank"][i]), np.asarray(t["curve_score"][i])
            line = ax.loglog(ranks, scores, ".", ms=3, color=f"C{n}", label=f"{t['query_id'][i]} (α={t['alpha'][i]:.2f})")[0]
            if np.isfinite(t["alpha"][i]) and t["tail_size"][i] > 0:
                r = np.geomspace(1, t["tail_size"][i], 50)
                ax.loglog(r, t["x_min"][i] * (r / t["tail_size"][i]) ** (1.0 / (1.0 - t["alpha"][i])), "-", lw=1, color=line.get_color())
        ax.set(title=LABELS.get(m, m), xlabel="rank", ylabel="influence (positive)")
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    written.append(_save(fig, folder / "study_rank.png"))

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (m, run) in zip(axes[0], runs.items()):
        t, kind = run["tables"]["layers"], {q["id"]: q["kind"] for q in run["queries"]}
        blocks = np.asarray(t["block"])
        order = np.unique(blocks)
        for n, k in enumerate(dict.fromkeys(kind[q] for q in t["query_id"])):
            mine = np.array([kind[q] == k for q in t["query_id"]])
            per_query = {}
            for q, b, s in zip(np.asarray(t["query_id"], dtype=object)[mine], blocks[mine], np.asarray(t["share"])[mine]):
                per_query.setdefault(q, np.zeros(order.size))[np.searchsorted(order, b)] += s
            ax.plot(order, np.nanmean(np.stack(list(per_query.values())), axis=0), "-o", ms=2, lw=1, color=f"C{n}", label=f"{k} ({len(per_query)})")
        ax.axhline(1.0 / order.size, color="grey", lw=0.5, ls=":")
        ax.set(title=LABELS.get(m, m), xlabel="block", ylabel="share of influence")
        ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(_save(fig, folder / "study_layers.png"))

    panels = [(m, g) for m, run in runs.items() for g in group_matrices(run)]  # one panel per group of 3+ languages
    if panels:
        cols = min(len(panels), 2)  # two panels a row, so that the figure stays readable at the page's width
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.ravel()[len(panels) :]:
            ax.set_visible(False)
        for ax, (m, g) in zip(axes.ravel(), panels):
            langs, mat, k = group_matrices(runs[m])[g]
            im = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=1.0)
            for (a, b), x in np.ndenumerate(mat):
                if np.isfinite(x):
                    ax.text(b, a, f"{x:.2f}", ha="center", va="center", fontsize=7, color="white" if x < 0.6 else "black")
            ax.set_xticks(range(len(langs)), langs)
            ax.set_yticks(range(len(langs)), langs)
            ax.set(title=f"{LABELS.get(m, m)}\n{g}: captured (top {k})", xlabel="query scored (to)", ylabel="top sequences of (from)")
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        written.append(_save(fig, folder / "study_crosslingual.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


def write_summary(out: Path, names: list[str], folder: Path, quick: bool = False) -> dict[str, Any]:
    """OUT/results.md and the figures; returns what OUT/results.json holds (the caller adds timings and writes it)."""
    out = Path(out)
    summary: dict[str, Any] = {"quick": quick, "paper": PAPER, "models": {}}
    for m in names:
        summary["models"][m] = model_summary(out / m)
        study = json.loads((out / m / "study.json").read_text())
        summary["models"][m]["wall_seconds"] = study.get("wall_seconds")
    summary["figures"] = [str(p) for p in figures(out, names, Path(folder))]
    (out / "results.md").write_text(markdown(summary), encoding="utf-8")
    return summary


__all__ = ["write_summary", "model_summary", "markdown", "figures", "PAPER"]
