"""Category 1, the environment and damaged run files: read-only folders, full disks, a truncated config.yaml, a damaged TF-IDF index.

Read-only folders are read-only bind mounts and full disks small tmpfs mounts, made in
the harness's private mount namespace (run.py enters one); without it these cases are
skipped, never passed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cases import REFUSED, SCORED_FLAGS, Case, Ctx
from harness import Result, changes, compare_tables, copy_run, observed, read_table, refused, run_cli, shown, snapshot, succeeded, tables_ok, truncate

# what a command that failed half-way may leave, by design: the resume area, its log, the lock
RESUME_AREA = ("staging/", "logs/", ".lock")


def _sh(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)


def can_mount(work: Path) -> bool:
    """True when this process may mount (run.py calls it only inside its private mount namespace)."""
    probe = work / "mount-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        _sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe)
        _sh("umount", probe)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


@contextlib.contextmanager
def readonly(path: Path) -> Iterator[Path]:
    _sh("mount", "--bind", path, path)
    try:
        _sh("mount", "-o", "remount,ro,bind", path)
        yield path
    finally:
        _sh("umount", "-l", path)


@contextlib.contextmanager
def small_disk(path: Path, kib: int = 65536) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _sh("mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=755", "tmpfs", path)
    try:
        yield path
    finally:
        _sh("umount", "-l", path)


def fill(path: Path, free_kib: int) -> None:
    """Shrink the tmpfs at ``path`` so that only ``free_kib`` KiB stay free."""
    st = os.statvfs(path)
    used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
    _sh("mount", "-o", f"remount,size={used_kib + free_kib}k", path)


def _outside_resume_area(diff: list[str]) -> list[str]:
    return [d for d in diff if not d.lstrip("+-~").startswith(RESUME_AREA)]


def _record(ctx: Ctx, result: Result, args: list, o, ok: bool, why: str, diff: list[str]) -> None:
    result.verdict = "PASS" if ok else "FAIL"
    result.observed = ctx.short(observed(o, diff, "" if ok else why))
    result.command = ctx.short(shown(args))
    result.rc, result.stderr_tail, result.changes = o.rc, ctx.short(o.tail(4)), diff[:12]


def _refusal(ctx: Ctx, result: Result, args: list, watched: list[Path], allow: tuple[str, ...] = ()) -> None:
    """Run ``args``; pass on the review's bad-input verdict over ``watched`` (changes under ``allow`` aside)."""
    before = [snapshot(w) for w in watched]
    o = run_cli([str(a) for a in args])
    diff = [d for w, b in zip(watched, before, strict=True) for d in changes(b, snapshot(w))]
    ok, why = refused(o, str(args[0]), [d for d in diff if not d.lstrip("+-~").startswith(allow)])
    _record(ctx, result, args, o, ok, why, diff)


def ro_new_subdir(ctx: Ctx, result: Result) -> None:
    ro = ctx.case_dir(102) / "ro"
    ro.mkdir()
    with readonly(ro):
        _refusal(ctx, result, ctx.fit_argv(ro / "sub"), [ro])


def ro_itself(ctx: Ctx, result: Result) -> None:
    ro = ctx.case_dir(103) / "ro"
    ro.mkdir()
    with readonly(ro):
        _refusal(ctx, result, ctx.fit_argv(ro), [ro])


def ro_up_to_date(ctx: Ctx, result: Result) -> None:
    run = copy_run(ctx.base("scored"), ctx.case_dir(104) / "run")
    args = ["score", "-o", run, "--queries", ctx.p["in"] / "q.jsonl", *SCORED_FLAGS]
    with readonly(run):
        o = run_cli([str(a) for a in args])
    ok, why = succeeded(o)
    _record(ctx, result, args, o, ok, why, [])


def ro_new_queries(ctx: Ctx, result: Result) -> None:
    run = copy_run(ctx.base("scored"), ctx.case_dir(105) / "run")
    with readonly(run):
        _refusal(ctx, result, ["score", "-o", run, "--queries", ctx.p["in"] / "q_unicode.jsonl", "--overwrite"], [run])


def ro_report(ctx: Ctx, result: Result) -> None:
    run = copy_run(ctx.base("scored"), ctx.case_dir(106) / "run")
    with readonly(run):
        _refusal(ctx, result, ["report", "-o", run], [run])


def ro_report_output(ctx: Ctx, result: Result) -> None:
    case = ctx.case_dir(107)
    run, out = copy_run(ctx.base("scored"), case / "run"), case / "out"
    out.mkdir()
    with readonly(out):
        _refusal(ctx, result, ["report", "-o", run, "--output", out / "report.html"], [run, out])


def full_disk_fit(ctx: Ctx, result: Result) -> None:
    with small_disk(ctx.case_dir(117) / "disk", kib=256) as disk:
        run = disk / "run"
        args = ctx.fit_argv(run, None, ctx.p["in"] / "corpus_small.jsonl")
        o = run_cli([str(a) for a in args])
        diff = changes(None, snapshot(run))
        in_place = [rel for rel in ("config.yaml", "run.json", "corpus", "factors") if (run / rel).exists()]
        ok, why = refused(o, "fit", [])
        if in_place:
            ok, why = False, f"{why}; left in place: {in_place}".strip("; ")
        _record(ctx, result, args, o, ok, why, diff)


def full_disk_report(ctx: Ctx, result: Result) -> None:
    with small_disk(ctx.case_dir(118) / "disk") as disk:
        run = copy_run(ctx.base("scored"), disk / "run")
        fill(disk, 64)
        _refusal(ctx, result, ["report", "-o", run], [run], allow=("logs/",))


def full_disk_overwrite(ctx: Ctx, result: Result) -> None:
    with small_disk(ctx.case_dir(121) / "disk") as disk:
        run = copy_run(ctx.base("scored"), disk / "run")
        fill(disk, 48)
        args = ["score", "-o", run, "--queries", ctx.p["in"] / "q_unicode.jsonl", "--overwrite"]
        before = snapshot(run)
        o = run_cli([str(a) for a in args])
        diff = changes(before, snapshot(run))
        if o.rc == 0:
            ok, why = succeeded(o)
            ids = read_table(run / "scores/queries.parquet")["query_id"]
            ok, why = (ok and len(ids) == 3), f"{why}; queries.parquet holds {ids}"
        else:
            ok, why = refused(o, "score", _outside_resume_area(diff))
        _record(ctx, result, args, o, ok, why, diff)


def _cut_config(text: str, parses: bool) -> str:
    """config.yaml cut where the review's was (before corpus.max_length: what is left still parses), or inside that key."""
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.strip().startswith("max_length:")), len(lines) // 2)
    return "".join(lines[:at]) + ("" if parses else lines[at][:6])


def _fit_sections_diff(a: dict, b: dict) -> list[str]:
    """The keys of the sections the fit was made with (model, corpus, fit) whose values differ."""
    return [f"{s}.{k}: {(a.get(s) or {}).get(k)!r} → {(b.get(s) or {}).get(k)!r}" for s in ("model", "corpus", "fit")
            for k in sorted(set(a.get(s) or {}) | set(b.get(s) or {})) if (a.get(s) or {}).get(k) != (b.get(s) or {}).get(k)]


def truncated_config(ctx: Ctx, result: Result) -> None:
    """config.yaml cut short, twice: where the rest is not YAML (refused naming config.yaml), and where it still parses (harmless, or refused)."""
    import yaml

    case = ctx.case_dir(116)
    intact = (ctx.base("fitted") / "config.yaml").read_text()
    verdicts, notes, shown_args, last = [], [], [], None
    for parses in (False, True):
        run = copy_run(ctx.base("fitted"), case / f"run-{'parses' if parses else 'invalid'}")
        (run / "config.yaml").write_text(_cut_config(intact, parses))
        args = ["score", "-o", run, "--queries", ctx.p["in"] / "q.jsonl"]
        before = snapshot(run)
        o = run_cli([str(a) for a in args])
        diff = changes(before, snapshot(run))
        if o.rc == 0 and parses:  # harmless only if the scores are those of the intact run
            ref = copy_run(ctx.base("fitted"), case / "reference")
            run_cli(["score", "-o", str(ref), "--queries", str(ctx.p["in"] / "q.jsonl"), "-q"])
            cmp = compare_tables(run, ref)
            rewritten = _fit_sections_diff(yaml.safe_load(intact), yaml.safe_load((run / "config.yaml").read_text()))
            ok, why = tables_ok(cmp), f"exit 0, tables vs the intact run: {cmp}; config.yaml now differs from the fit's in {rewritten}"
        else:
            ok, why = refused(o, "score", diff, ("config.yaml",), ("different run",))
            why = f"rc={o.rc}: {o.tail(1)[:200]}" + (f" ({why})" if why else "")
        verdicts.append(ok)
        notes.append(f"{'still parses' if parses else 'not YAML'}: {'PASS' if ok else 'FAIL'}, {why}")
        shown_args.append(shown(args))
        last = o
    result.verdict = "PASS" if all(verdicts) else "FAIL"
    result.observed = ctx.short("; ".join(notes))
    result.command = ctx.short(" ; ".join(shown_args))
    result.rc, result.stderr_tail = last.rc, ctx.short(last.tail(3))


def damaged_tfidf(ctx: Ctx, result: Result) -> None:
    """A damaged TF-IDF index (a cache the score stage builds): rebuilt with exit 0, or a clean refusal."""
    from lminfluence.filtering.tfidf import TfidfIndex

    run = copy_run(ctx.base("scored"), ctx.case_dir(119) / "run")
    truncate(run / "corpus/tfidf.npz")
    args = ["score", "-o", run, "--queries", ctx.p["in"] / "q_unicode.jsonl", "--candidates", "20", "--overwrite"]
    before = snapshot(run)
    o = run_cli([str(a) for a in args])
    diff = changes(before, snapshot(run))
    if o.rc == 0:
        ok, why = succeeded(o)
        ids = read_table(run / "scores/queries.parquet")["query_id"]
        try:
            TfidfIndex.load(run / "corpus/tfidf.npz")
            rebuilt = True
        except Exception:  # noqa: BLE001 - any failure to read it back is the finding
            rebuilt = False
        ok, why = ok and rebuilt and len(ids) == 3, f"{why}; index rebuilt: {rebuilt}; queries.parquet holds {ids}"
        diff = []
    else:
        ok, why = refused(o, "score", diff)
    _record(ctx, result, args, o, ok, why, diff)


def cases() -> list[Case]:
    cat = "1 bad input"
    staged = "a fit or score that fails half-way keeps its work in RUN/staging/ (and its log) so that a rerun resumes: that area may change"
    return [
        Case(102, cat, "fit into read-only dir (new subdir)", REFUSED, ro_new_subdir, needs_mount=True),
        Case(103, cat, "fit into read-only dir (itself)", REFUSED, ro_itself, needs_mount=True),
        Case(104, cat, "score on a read-only scored run (same settings = up to date)", "exit 0", ro_up_to_date, needs_mount=True),
        Case(105, cat, "score on a read-only scored run, new queries --overwrite", REFUSED, ro_new_queries, needs_mount=True),
        Case(106, cat, "report on a read-only run", REFUSED, ro_report, needs_mount=True),
        Case(107, cat, "report --output into read-only dir", REFUSED, ro_report_output, needs_mount=True),
        Case(116, cat, "score with truncated config.yaml (cut inside a key, and cut where the rest still parses)",
             "exit 2 naming config.yaml, run dir unchanged; where the rest still parses, that or exit 0 with the intact run's scores",
             truncated_config, adapted="a truncated config.yaml that still parses as valid YAML is harmless when the scores equal the intact run's"),
        Case(117, cat, "fit on a full disk (256 KiB tmpfs)", "exit 2, one error line, no traceback, nothing put in place (config.yaml, run.json, corpus/, factors/)",
             full_disk_fit, adapted=staged, needs_mount=True),
        Case(118, cat, "report on a full disk (earlier report kept?)", "exit 2, one error line, no traceback, run dir unchanged but for its log",
             full_disk_report, adapted="as for #117 and #121, a command that began its work and then met a full disk may have logged the attempt in RUN/logs/",
             needs_mount=True),
        Case(119, cat, "score with truncated corpus/tfidf.npz (new queries)", "exit 0 with the index rebuilt and the new scores complete, or exit 2 with the run dir unchanged",
             damaged_tfidf, adapted="the TF-IDF index is now a cache that is rebuilt when it cannot be read (a warning), so exit 0 is correct"),
        Case(121, cat, "score --overwrite with new queries on a full disk", "exit 0 with complete new scores, or exit 2 with the earlier results byte-for-byte intact",
             full_disk_overwrite, adapted=staged, needs_mount=True),
    ]


__all__ = ["cases", "can_mount", "readonly", "small_disk", "fill"]
