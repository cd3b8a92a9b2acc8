"""What a case is, the context every case runs in, and the table-driven command-line case.

A ``Case`` carries the review's number, category, description and expectation,
and a function that runs it and fills in its ``Result``. ``cli_case`` builds the
common kind: prepare a run directory (none, a copy of the fitted run or of the
scored run), optionally damage something, run one command in this process and
judge it (``refused``: the review's bad-input verdict; ``succeeds``: exit 0;
``either``: exit 0 or a clean refusal).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Outcome, Result, changes, copy_run, observed, refused, run_cli, shown, snapshot, succeeded

REFUSED = "exit 2, one error line, no traceback, run dir unchanged"
CATEGORIES = {
    1: "1 bad input",
    2: "2 crash safety",
    3: "3 concurrency",
    4: "4 determinism",
    5: "5 stale results",
    6: "6 python API",
    7: "7 security",
}


@dataclass
class Case:
    id: int
    category: str
    name: str
    expected: str
    run: Callable[[Ctx, Result], None]
    adapted: str = ""  # why the expectation differs from the review's
    needs_mount: bool = False


class Ctx:
    """The inputs, the base runs (built on first use) and a fresh folder per case."""

    def __init__(self, work: Path, paths: dict[str, Path], can_mount: bool) -> None:
        self.work, self.p, self.can_mount = work, paths, can_mount
        self._bases: dict[str, Path] = {}
        self.cache: dict[str, Any] = {}

    def case_dir(self, case_id: int) -> Path:
        d = self.work / "cases" / f"{case_id:03d}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def fit_argv(self, run: Path, model: str | Path | None = None, corpus: str | Path | None = None, *extra: str) -> list[str]:
        return ["fit", "--model", str(model or self.p["A"]), "--corpus", str(corpus or self.p["corpus"]), "--max-length", "128", "-o", str(run), *extra]

    def base(self, name: str) -> Path:
        """``fitted`` (model A, the corpus), ``scored`` (+ score and report), ``fitted_B`` (model B), ``fitted_small`` (12 documents)."""
        if name not in self._bases:
            root = self.work / "base" / name
            if root.exists():
                shutil.rmtree(root)
            if name == "scored":
                copy_run(self.base("fitted"), root)
                self._must(["score", "-o", root, "--queries", self.p["in"] / "q.jsonl", *SCORED_FLAGS, "-q"])
                self._must(["report", "-o", root, "-q"])
            elif name == "fitted":
                self._must([*self.fit_argv(root), "-q"])
            elif name == "fitted_B":
                self._must([*self.fit_argv(root, model=self.p["B"]), "-q"])
            elif name == "fitted_small":
                self._must([*self.fit_argv(root, corpus=self.p["in"] / "corpus_small.jsonl"), "-q"])
            else:
                raise KeyError(name)
            self._bases[name] = root
        return self._bases[name]

    @staticmethod
    def _must(argv: list) -> None:
        o = run_cli([str(a) for a in argv])
        if o.rc != 0:
            raise RuntimeError(f"building a base run failed: {shown(argv)}: rc={o.rc}: {o.stderr[-2000:]}")

    def short(self, text: str) -> str:
        return text.replace(str(self.work), "WORK")


# the base score of the "scored run" (the review's, less --save-matrix: the matrix is now written by default)
SCORED_FLAGS = ["--candidates", "50", "--rank", "8", "--rescore-top", "20"]


def cli_case(
    case_id: int,
    name: str,
    base: str,
    argv: list[str],
    *,
    expect: str = "refused",
    mentions: tuple[str, ...] = (),
    avoid: tuple[str, ...] = (),
    setup: Callable[[Ctx, Path, Path], dict[str, Any] | None] | None = None,
    check: Callable[[Ctx, Path, Outcome], tuple[bool, str]] | None = None,
    watch: tuple[str, ...] = (),
    expected: str | None = None,
    adapted: str = "",
    category: int = 1,
) -> Case:
    """A case that runs one command on a prepared run directory ``{run}``.

    ``argv`` items are formatted with the input paths (``{A}``, ``{corpus}``, ``{in}`` …), ``{run}``,
    ``{case}`` (the case's folder) and whatever ``setup(ctx, run, case_dir)`` returns. ``mentions``:
    words the error line must contain (so a case refused for another reason, such as a harness mistake,
    does not pass); ``avoid``: words it must not contain (the review's misleading messages).
    """
    exp = expected or {"refused": REFUSED, "succeeds": "exit 0", "either": "exit 0 or clean exit 2"}[expect]

    def run(ctx: Ctx, result: Result) -> None:
        case = ctx.case_dir(case_id)
        run_dir = case / "run"
        if base != "new":
            copy_run(ctx.base(base), run_dir)
        keys: dict[str, Any] = {**{k: str(v) for k, v in ctx.p.items()}, "run": str(run_dir), "case": str(case)}
        keys.update((setup(ctx, run_dir, case) if setup else None) or {})
        args = [a.format(**keys) for a in argv]
        watched = [run_dir, *(Path(w.format(**keys)) for w in watch)]
        before = [snapshot(w) for w in watched]
        o = run_cli(args)
        diff = [d for w, b in zip(watched, before, strict=True) for d in changes(b, snapshot(w))]
        command = args[0]
        if expect == "refused" or (expect == "either" and o.rc != 0):
            ok, why = refused(o, command, diff, mentions, avoid)
            diff_shown = diff
        else:
            ok, why = succeeded(o)
            diff_shown = []
            if ok and check is not None:
                ok, why = check(ctx, run_dir, o)
        result.verdict = "PASS" if ok else "FAIL"
        result.observed = ctx.short(observed(o, diff_shown, "" if ok else why))
        result.command = ctx.short(shown(args))
        result.rc, result.stderr_tail, result.changes = o.rc, ctx.short(o.tail(4)), diff_shown[:12]

    return Case(case_id, CATEGORIES[category], name, exp, run, adapted)


__all__ = ["Case", "Ctx", "cli_case", "REFUSED", "CATEGORIES", "SCORED_FLAGS"]
