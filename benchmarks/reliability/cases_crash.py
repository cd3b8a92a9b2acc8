"""Categories 2-4: kill -9 and Ctrl-C (crash safety), two commands on one run directory (concurrency), determinism.

Every command here runs the real console script in a subprocess. Kills land either at an
exact point of the work (killpoint.py: the process SIGKILLs itself right after, say, its
second chunk file was written) or, like the review's first trial and its "random point",
after a share of the uninterrupted run's duration. A kill point that is never reached fails
the case: it was not tested. After each kill the same command is run again; it must exit 0
and produce outputs identical to an uninterrupted run (score tables byte for byte; factors
tensor for tensor, since their manifest records timings; the tokenized corpus byte for byte).
"""

from __future__ import annotations

import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cases import Case, Ctx
from harness import (
    Outcome,
    Result,
    compare_fit,
    compare_tables,
    copy_run,
    finish,
    fit_ok,
    killpoint,
    read_table,
    run_script,
    shown,
    start,
    tables_ok,
    tmp_files,
)

CRASH_SCORE = ["--candidates", "50", "--rank", "8", "--rescore-top", "20", "--chunk-size", "4"]
CONC_SCORE = ["--candidates", "8", "--chunk-size", "4", "--top", "3"]


def _fit_args(ctx: Ctx, run: Path, *extra: str) -> list[str]:
    return [str(a) for a in ctx.fit_argv(run)] + list(extra)


def _score_args(ctx: Ctx, run: Path, queries: str = "q_all.jsonl", flags: list[str] = CRASH_SCORE) -> list[str]:
    return ["score", "-o", str(run), "--queries", str(ctx.p["in"] / queries), *flags]


def reference(ctx: Ctx, name: str) -> tuple[Path, Outcome]:
    """Uninterrupted runs by the real script: ``fit``, ``score`` (the crash settings), ``conc4``/``conc3``."""
    key = f"ref:{name}"
    if key not in ctx.cache:
        root = ctx.work / "ref" / name
        if root.exists():
            shutil.rmtree(root)
        if name == "fit":
            o = run_script(_fit_args(ctx, root))
        else:
            copy_run(reference(ctx, "fit")[0], root)
            queries = {"score": "q_all.jsonl", "conc4": "q.jsonl", "conc3": "q_unicode.jsonl"}[name]
            o = run_script(_score_args(ctx, root, queries, CRASH_SCORE if name == "score" else CONC_SCORE))
        if o.rc != 0:
            raise RuntimeError(f"reference run {name} failed: rc={o.rc}: {o.stderr[-2000:]}")
        ctx.cache[key] = (root, o)
    return ctx.cache[key]


def _interrupted(o: Outcome, command: str, action: str) -> tuple[bool, str]:
    if action == "int":
        lines = [line for line in o.stderr.splitlines() if f"lminfluence {command}: interrupted" in line]
        ok = o.rc == 130 and len(lines) == 1 and not o.traceback
        return ok, f"rc={o.rc}; interrupted lines={len(lines)}; traceback={o.traceback}"
    return o.rc == -9, f"rc={o.rc}" + ("" if o.rc == -9 else " (the kill point was not reached)")


@dataclass(frozen=True)
class Timed:
    """An external ``kill -9`` after ``share`` of the reference's duration, counted from the start or, with
    ``after_tokenizing``, from when the tokenized corpus appears (then the share is of the fit passes' time)."""

    share: float
    after_tokenizing: bool = False


def _fit_seconds(o: Outcome) -> float:
    found = re.search(r"fitted \w+ factors on \d+ layers in ([\d.]+)s", o.stderr)
    return float(found.group(1)) if found else 1.0


def _kill_timed(args: list[str], run: Path, at: Timed, ref: Outcome) -> tuple[Outcome, bool, str]:
    t0 = time.perf_counter()
    proc = start(args)
    if at.after_tokenizing:
        anchor = run / "staging/fit/corpus/tokens.safetensors"
        while not anchor.exists() and proc.poll() is None:
            time.sleep(0.01)
        delay, of = at.share * _fit_seconds(ref), f"after tokenizing, of the {_fit_seconds(ref):.1f}s fit"
    else:
        delay, of = at.share * ref.seconds, f"of the {ref.seconds:.1f}s run"
    time.sleep(delay)
    alive = proc.poll() is None
    proc.kill()
    first = finish(proc, t0)
    return first, alive and first.rc == -9, f"killed {delay:.2f}s {of} (alive={alive})"


def _crash(ctx: Ctx, result: Result, case_id: int, stage: str, at: str | Timed, action: str = "kill") -> None:
    """Interrupt ``stage`` (at a killpoint, or after some time), rerun it, compare with the uninterrupted run."""
    case = ctx.case_dir(case_id)
    run = case / "run"
    if stage == "score":
        copy_run(reference(ctx, "fit")[0], run)
        args, (ref, ref_outcome) = _score_args(ctx, run), reference(ctx, "score")
    else:
        args, (ref, ref_outcome) = _fit_args(ctx, run), reference(ctx, "fit")
    if isinstance(at, Timed):
        first, ok, why = _kill_timed(args, run, at, ref_outcome)
    else:
        first = run_script(args, prefix=killpoint(at, action))
        ok, why = _interrupted(first, stage, action)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) if run.exists() else []
    tmps = tmp_files(run)
    second = run_script(args)
    resumed = "already done" in second.stderr or "resuming" in second.stderr
    cmp = compare_tables(run, ref) if stage == "score" else compare_fit(run, ref)
    same = tables_ok(cmp) if stage == "score" else fit_ok(cmp)
    after = tmp_files(run) + (["staging/"] if (run / "staging").exists() else [])
    result.verdict = "PASS" if ok and second.rc == 0 and same and not after else "FAIL"
    result.observed = ctx.short(
        f"{why}; left before the rerun: {len(left)} files ({len(tmps)} *.tmp); rerun rc={second.rc} in {second.seconds:.0f}s"
        f"{', resumed' if resumed else ''}; compare: {cmp}" + (f"; left after the rerun: {after}" if after else "")
    )
    prefix = "lminfluence" if isinstance(at, Timed) else f"killpoint.py --at {at} --do {action} --"
    result.command = ctx.short(shown(args, prefix))
    result.rc, result.stderr_tail = first.rc, ctx.short(first.tail(3) + (" || rerun: " + second.tail(3) if second.rc else ""))


def crash(case_id: int, stage: str, at: str | Timed, action: str = "kill"):
    return lambda ctx, result: _crash(ctx, result, case_id, stage, at, action)


# ---- concurrency ----


def _wait_for(path: Path, proc, timeout: float = 600) -> bool:
    t0 = time.perf_counter()
    while not path.exists():
        if proc.poll() is not None or time.perf_counter() - t0 > timeout:
            return False
        time.sleep(0.05)
    return True


def _clean_refusal(o: Outcome, command: str) -> bool:
    return o.rc == 2 and len(o.error_lines(command)) == 1 and not o.traceback


def _two_scores(ctx: Ctx, result: Result, case_id: int, second_queries: str) -> None:
    """A: score, paused inside its work; B: another score on the same run directory meanwhile."""
    case = ctx.case_dir(case_id)
    run = copy_run(reference(ctx, "fit")[0], case / "run")
    refs = {"q.jsonl": reference(ctx, "conc4")[0], "q_unicode.jsonl": reference(ctx, "conc3")[0]}
    reached = case / "reached"
    args_a, args_b = _score_args(ctx, run, "q.jsonl", CONC_SCORE), _score_args(ctx, run, second_queries, CONC_SCORE)
    t0 = time.perf_counter()
    proc_a = start(args_a, prefix=killpoint("chunks:1", "pause:15"), KILLPOINT_REACHED=str(reached))
    overlapped = _wait_for(reached, proc_a)
    b = run_script(args_b)
    still_running = proc_a.poll() is None
    a = finish(proc_a, t0)
    final = {name: compare_tables(run, ref) for name, ref in refs.items()}
    whole = [name for name, cmp in final.items() if tables_ok(cmp)]
    b_ok = b.rc == 0 or _clean_refusal(b, "score")
    ok = overlapped and still_running and a.rc == 0 and b_ok and len(whole) == 1 and not a.traceback and not b.traceback
    result.verdict = "PASS" if ok else "FAIL"
    result.observed = ctx.short(
        f"B ran while A was inside its work: {overlapped and still_running}; rc A={a.rc}, B={b.rc}; B: {b.tail(1)}; "
        f"final tables are wholly those of: {whole or 'no single run (mixed or missing)'}; traceback A={a.traceback}, B={b.traceback}"
    )
    result.command = ctx.short(f"{shown(args_a, 'killpoint.py --at chunks:1 --do pause:15 --')} & then {shown(args_b)}")
    result.rc, result.stderr_tail = b.rc, ctx.short(b.tail(2))


def report_during_overwrite(ctx: Ctx, result: Result) -> None:
    case = ctx.case_dir(152)
    run = copy_run(ctx.base("scored"), case / "run")
    reached = case / "reached"
    args = _score_args(ctx, run, "q_unicode.jsonl", CONC_SCORE) + ["--overwrite"]
    t0 = time.perf_counter()
    proc = start(args, prefix=killpoint("chunks:1", "pause:20"), KILLPOINT_REACHED=str(reached))
    overlapped = _wait_for(reached, proc)
    reports = []
    while proc.poll() is None and len(reports) < 3:
        reports.append(run_script(["report", "-o", str(run), "-q"]))
    score = finish(proc, t0)
    last = run_script(["report", "-o", str(run), "-q"])
    each_ok = all(r.rc == 0 or _clean_refusal(r, "report") for r in reports) and not any(r.traceback for r in reports)
    ok = overlapped and bool(reports) and each_ok and score.rc == 0 and last.rc == 0
    result.verdict = "PASS" if ok else "FAIL"
    result.observed = ctx.short(
        f"score rc={score.rc}; {len(reports)} reports during it: {[(r.rc, r.traceback) for r in reports]} (rc, traceback); "
        f"messages: {[r.tail(1) for r in reports if r.rc]}; report after score rc={last.rc}"
    )
    result.command = ctx.short(f"{shown(args, 'killpoint.py --at chunks:1 --do pause:20 --')} & lminfluence report -o RUN (in a loop)")
    result.rc = score.rc


# ---- determinism ----


def _matrix(run: Path) -> dict[tuple[int, int], float]:
    t = read_table(run / "scores/matrix.parquet")
    return {(q, s): v for q, s, v in zip(t["query_index"], t["seq_index"], t["score"], strict=True)}


def _top1(run: Path) -> dict[int, int]:
    t = read_table(run / "scores/top.parquet")
    return {q: s for q, s, r in zip(t["query_index"], t["seq_index"], t["rank"], strict=True) if r == 1}


def _again(ctx: Ctx, result: Result, case_id: int, extra_fit: list[str], min_pearson: float | None, top1: bool = False, **env: str) -> None:
    """Fit and score again in a new run directory (with other settings or threads); compare with the reference."""
    run = ctx.case_dir(case_id) / "run"
    fit = run_script(_fit_args(ctx, run, *extra_fit), **env)
    score = run_script(_score_args(ctx, run), **env) if fit.rc == 0 else fit
    if fit.rc or score.rc:
        result.verdict, result.observed = "FAIL", f"rc fit={fit.rc}, score={score.rc}: {score.tail(2)}"
        return
    ref = reference(ctx, "score")[0]
    if min_pearson is None:  # the same settings: identical outputs
        cmp_fit, cmp_tables = compare_fit(run, reference(ctx, "fit")[0]), compare_tables(run, ref)
        result.verdict = "PASS" if fit_ok(cmp_fit) and tables_ok(cmp_tables) else "FAIL"
        result.observed = f"{cmp_fit}; tables: {cmp_tables}"
    else:
        a, b = _matrix(run), _matrix(ref)
        keys = sorted(set(a) & set(b))
        x, y = np.array([a[k] for k in keys], float), np.array([b[k] for k in keys], float)
        pearson = float(np.corrcoef(x, y)[0, 1])
        rel = float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
        t1, t2 = _top1(run), _top1(ref)
        agree = np.mean([t1.get(q) == s for q, s in t2.items()])
        same_pairs = set(a) == set(b)
        result.verdict = "PASS" if same_pairs and pearson >= min_pearson and (agree == 1.0 or not top1) else "FAIL"
        result.observed = f"same scored pairs: {same_pairs}; Pearson={pearson:.8f}; max |Δ|/max|s|={rel:.2e}; top-1 agreement {agree:.0%}"
    result.command = ctx.short(" ; ".join(filter(None, [" ".join(f"{k}={v}" for k, v in env.items()), shown(_fit_args(ctx, run, *extra_fit)), shown(_score_args(ctx, run))])))


def cases() -> list[Case]:
    c2, c3, c4 = "2 crash safety", "3 concurrency", "4 determinism"
    same = "rerun exits 0, tables identical to an uninterrupted run"
    fit_same = "rerun exits 0; factors/corpus identical to an uninterrupted run"
    ctrl_c = "exit 130, one 'interrupted; run the same command again to resume' line, no traceback; rerun identical"
    return [
        Case(137, c2, "score kill -9 at 11% of an uninterrupted run's time (start-up)", "rerun exits 0, outputs identical to an uninterrupted run", crash(137, "score", Timed(0.11))),
        Case(138, c2, "score kill -9 after 2 finished chunk files", same, crash(138, "score", "chunks:2")),
        Case(139, c2, "score kill -9 after 9 finished chunk files", same, crash(139, "score", "chunks:9")),
        Case(140, c2, "fit kill -9 right after factors/ was put in place (before run.json is updated)", fit_same, crash(140, "fit", "factors-in-place")),
        Case(141, c2, "fit: SIGINT (Ctrl-C) mid-run (covariance pass, batch 5)", ctrl_c, crash(141, "fit", "covariance:5", "int")),
        Case(142, c2, "score: SIGINT (Ctrl-C) mid-run (after 3 chunk files)", ctrl_c, crash(142, "score", "chunks:3", "int")),
        Case(143, c2, "score kill -9 while the tables are written (after 2 of them)", same, crash(143, "score", "tables:2")),
        Case(144, c2, "score kill -9 in the detail phase (after its chunk file)", same, crash(144, "score", "details")),
        Case(145, c2, "fit kill -9 just after tokenizing (before the covariance pass)", fit_same, crash(145, "fit", "tokenized")),
        Case(146, c2, "fit kill -9 during the covariance pass (batch 8)", fit_same, crash(146, "fit", "covariance:8")),
        Case(147, c2, "fit kill -9 later in the fit (eigenvalue-correction pass, batch 10)", fit_same, crash(147, "fit", "correction:10")),
        Case(148, c2, "fit kill -9 at a random point of the fit (a seeded share of its passes' time)", fit_same, crash(148, "fit", Timed(random.Random(148).uniform(0.1, 0.9), after_tokenizing=True))),
        Case(149, c2, "score kill -9 after 17 chunk files", same, crash(149, "score", "chunks:17")),
        Case(150, c3, "two identical `score` at once on one run dir", "both succeed with identical results, or the second is refused clearly (exit 2)",
             lambda ctx, r: _two_scores(ctx, r, 150, "q.jsonl")),
        Case(151, c3, "two different `score` (4 vs 3 queries) at once on one fitted run dir", "one refused clearly (run dir in use), or both correct; never tables from two runs mixed",
             lambda ctx, r: _two_scores(ctx, r, 151, "q_unicode.jsonl")),
        Case(152, c3, "`report` in a loop while `score --overwrite` runs", "each report either succeeds or is refused in one line; no traceback; final report fine", report_during_overwrite),
        Case(153, c4, "same fit+score twice", "identical factors and tables", lambda ctx, r: _again(ctx, r, 153, [], None)),
        Case(154, c4, "OMP_NUM_THREADS=1 vs 2", "Pearson ≥ 0.9999; same top-1", lambda ctx, r: _again(ctx, r, 154, [], 0.9999, top1=True, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")),
        Case(155, c4, "float32 vs --dtype float64", "Pearson ≥ 0.999", lambda ctx, r: _again(ctx, r, 155, ["--dtype", "float64"], 0.999)),
    ]


__all__ = ["cases", "reference"]
