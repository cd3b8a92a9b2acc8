"""Category 5, stale results: the model, tokenizer or corpus changes after `fit`; the next command must notice.

Each case fits a fresh run on its own copy of model A (and of the corpus), changes
that copy, and runs the next command in this process.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from cases import Case, Ctx
from harness import Result, changes, observed, read_table, refused, run_cli, shown, snapshot, succeeded
from inputs import edit_weight

CANDIDATES = ["--candidates", "5"]


def _fitted(ctx: Ctx, case_id: int, scored: bool = False) -> tuple[Path, Path, Path, list[str]]:
    """(model copy, corpus copy, run, the fit command) of a run fitted on the copies."""
    case = ctx.case_dir(case_id)
    model, corpus, run = case / "model", case / "corpus.jsonl", case / "run"
    shutil.copytree(ctx.p["A"], model)
    shutil.copy(ctx.p["corpus"], corpus)
    fit = [str(a) for a in ctx.fit_argv(run, model, corpus)]
    for argv in [fit + ["-q"]] + ([_score(ctx, run) + ["-q"]] if scored else []):
        o = run_cli(argv)
        if o.rc != 0:
            raise RuntimeError(f"{shown(argv)} failed: {o.stderr[-1500:]}")
    return model, corpus, run, fit


def _score(ctx: Ctx, run: Path) -> list[str]:
    return ["score", "-o", str(run), "--queries", str(ctx.p["in"] / "q.jsonl"), *CANDIDATES]


def _judge(ctx: Ctx, result: Result, run: Path, argv: list[str], mentions: tuple[str, ...], avoid: tuple[str, ...] = ()) -> None:
    before = snapshot(run)
    o = run_cli(argv)
    diff = changes(before, snapshot(run))
    ok, why = refused(o, argv[0], diff, mentions, avoid)
    result.verdict = "PASS" if ok else "FAIL"
    result.observed = ctx.short(observed(o, diff, "" if ok else why))
    result.command = ctx.short(shown(argv))
    result.rc, result.stderr_tail, result.changes = o.rc, ctx.short(o.tail(3)), diff[:12]


def changed_model(case_id: int, change: Callable[[Ctx, Path], object], mentions: tuple[str, ...], scored: bool = False, bare: bool = False):
    def run(ctx: Ctx, result: Result) -> None:
        model, _, run_dir, _ = _fitted(ctx, case_id, scored)
        change(ctx, model)
        argv = ["score", "-o", str(run_dir)] if bare else _score(ctx, run_dir)
        _judge(ctx, result, run_dir, argv, mentions, ("up to date",))

    return run


def _other_model(ctx: Ctx, model: Path) -> None:
    shutil.rmtree(model)
    shutil.copytree(ctx.p["B"], model)


def _other_tokenizer(ctx: Ctx, model: Path) -> None:
    for f in ctx.p["tokenizer_other"].iterdir():
        shutil.copy(f, model / f.name)


def _edit_corpus(corpus: Path) -> None:
    """Every document's text replaced (ids kept): if a command read the file again, it would show."""
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    corpus.write_text("".join(json.dumps({"id": r["id"], "text": f"EDITED document {i} after the fit."}) + "\n" for i, r in enumerate(rows)))


def corpus_then_score(ctx: Ctx, result: Result) -> None:
    _, corpus, run, _ = _fitted(ctx, 160)
    _edit_corpus(corpus)
    argv = _score(ctx, run)
    before = snapshot(run)
    o = run_cli(argv)
    diff = changes(before, snapshot(run))
    if o.rc == 0:
        ok, why = succeeded(o)
        texts = read_table(run / "scores/top.parquet")["text"]
        edited = sum("EDITED" in t for t in texts)
        ok, why, diff = ok and edited == 0, f"scored against the stored (pre-edit) corpus: {edited == 0} ({len(texts)} shown rows, {edited} from the edited file)", []
    else:
        ok, why = refused(o, "score", diff, ("corpus",))
    result.verdict = "PASS" if ok else "FAIL"
    result.observed = ctx.short(observed(o, diff, why))
    result.command = ctx.short(shown(argv))
    result.rc, result.stderr_tail = o.rc, ctx.short(o.tail(3))


def corpus_then_fit(ctx: Ctx, result: Result) -> None:
    _, corpus, run, fit = _fitted(ctx, 162)
    _edit_corpus(corpus)
    _judge(ctx, result, run, fit, ("corpus", "--overwrite"))


def cases() -> list[Case]:
    cat = "5 stale results"
    return [
        Case(156, cat, "model weights (tracked MLP layer) replaced after fit, then score", "exit 2: factors belong to another model",
             changed_model(156, lambda ctx, m: edit_weight(m, "h.0.mlp.c_fc.weight"), ("model",))),
        Case(157, cat, "model folder replaced by another model (other shapes), then score", "exit 2, one line", changed_model(157, _other_model, ("model",))),
        Case(158, cat, "model weights (embedding only, untracked) replaced after fit, then score", "exit 2: the model changed since fit",
             changed_model(158, lambda ctx, m: edit_weight(m, "wte"), ("model",))),
        Case(159, cat, "tokenizer replaced after fit (queries now tokenized differently from the corpus), then score", "exit 2: the model/tokenizer changed since fit",
             changed_model(159, _other_tokenizer, ("tokenizer",))),
        Case(160, cat, "corpus file edited after fit, then score", "refuse (exit 2: corpus changed, refit) or score the stored corpus consistently", corpus_then_score),
        Case(161, cat, "scored run; tracked weights changed; bare `score` again", "exit 2 (model changed) rather than 'up to date'",
             changed_model(161, lambda ctx, m: edit_weight(m, "h.0.mlp.c_fc.weight"), ("model",), scored=True, bare=True)),
        Case(162, cat, "corpus file edited after fit, then the same fit command", "exit 2 naming the change and --overwrite", corpus_then_fit),
    ]


__all__ = ["cases"]
