"""Category 7, security: no input runs code; the report escapes what it shows; outputs follow the umask.

The hostile inputs (inputs.py) would each create a file under WORK/markers if their code
ran; they are given to the real script in a subprocess, and a case passes only when no
marker appeared.
"""

from __future__ import annotations

import os
from pathlib import Path

from cases import Case, Ctx
from harness import Result, read_table, run_cli, run_script, shown
from inputs import markers_created


def hostile(case_id: int, model: str, extra: tuple[str, ...], accept_success: bool, config: str | None = None):
    """Fit with a hostile model folder (or config); refused (or, where allowed, ignored), and no marker file."""

    def run(ctx: Ctx, result: Result) -> None:
        run_dir = ctx.case_dir(case_id) / "run"
        argv = [str(a) for a in ctx.fit_argv(run_dir, ctx.p[model])] + list(extra)
        if config:
            argv += ["--config", str(ctx.p["in"] / config)]
        before = set(markers_created(ctx.p))
        o = run_script(argv)
        markers = sorted(set(markers_created(ctx.p)) - before)
        one_line = o.rc == 2 and len(o.error_lines("fit")) == 1 and not o.traceback
        refused_ok = one_line or (o.rc != 0 and case_id == 208)  # the review judged #208 on code execution only (#134 judges its exit)
        ok = not markers and (refused_ok or (accept_success and o.rc == 0))
        result.verdict = "PASS" if ok else "FAIL"
        result.observed = ctx.short(f"rc={o.rc}; {o.tail(1)[:300]}; marker files created: {markers or 'none'}")
        result.command = ctx.short(shown(argv))
        result.rc, result.stderr_tail = o.rc, ctx.short(o.tail(3))

    return run


def xss(ctx: Ctx, result: Result) -> None:
    """Payloads in document ids and texts, query ids, prompts and completions; the report shows them escaped."""
    run = ctx.case_dir(210) / "run"
    steps = [
        [*map(str, ctx.fit_argv(run, None, ctx.p["in"] / "c_xss.jsonl")), "--strategy", "identity", "-q"],
        ["score", "-o", str(run), "--queries", str(ctx.p["in"] / "q_xss.jsonl"), "--top", "6", "-q"],
        ["report", "-o", str(run), "-q"],
    ]
    rcs = [run_cli(s).rc for s in steps]
    if any(rcs):
        result.verdict, result.observed = "FAIL", f"rc={rcs}"
        return
    html = (run / "report/index.html").read_text(encoding="utf-8")
    raw = [p for p in ("<script>alert", "<img src=x onerror") if p in html.lower()]
    escaped = html.count("&lt;script&gt;alert") + html.count("&lt;img src=x onerror")
    shown_ids = read_table(run / "scores/top.parquet")["doc_id"]
    xss_shown = any("<script>" in d for d in shown_ids)
    result.verdict = "PASS" if not raw and escaped > 0 and xss_shown else "FAIL"
    result.observed = f"rc={rcs}; raw tags found: {raw}; escaped payload occurrences: {escaped}; an XSS doc id among shown rows: {xss_shown}"
    result.command = ctx.short(" ; ".join(shown(s) for s in steps))


def _umask_run(ctx: Ctx) -> Path:
    """fit, score and report under umask 022 (once, for #211 and #212)."""
    if "umask_run" not in ctx.cache:
        run = ctx.work / "base" / "umask"
        old = os.umask(0o022)
        try:
            for argv in ([*map(str, ctx.fit_argv(run)), "-q"], ["score", "-o", str(run), "--queries", str(ctx.p["in"] / "q.jsonl"), "--candidates", "20", "-q"], ["report", "-o", str(run), "-q"]):
                o = run_cli(argv)
                if o.rc != 0:
                    raise RuntimeError(f"{shown(argv)}: rc={o.rc}: {o.stderr[-1500:]}")
        finally:
            os.umask(old)
        ctx.cache["umask_run"] = run
    return ctx.cache["umask_run"]


def modes(ctx: Ctx, result: Result) -> None:
    run = _umask_run(ctx)
    files = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in sorted(run.rglob("*")) if p.is_file()}
    other = {k: oct(v) for k, v in files.items() if v != 0o644}
    result.verdict = "PASS" if files and not other else "FAIL"
    result.observed = f"{len(files)} files; not 0o644: {other or 'none'}"
    result.command = ctx.short(f"umask 022; fit, score, report into {run}; stat every file")


def world_writable(ctx: Ctx, result: Result) -> None:
    run = _umask_run(ctx)
    found = [str(p.relative_to(run)) for p in run.rglob("*") if p.stat().st_mode & 0o002]
    result.verdict = "PASS" if not found else "FAIL"
    result.observed = f"world-writable: {found}"
    result.command = ctx.short(f"find {run} -perm -o+w")


def cases() -> list[Case]:
    cat = "7 security"
    no_code = "no marker file created"
    return [
        Case(206, cat, "model with auto_map remote code (no trust flag)", f"refused (exit 2), the model's .py files never imported ({no_code})",
             hostile(206, "evil_remote", (), accept_success=False)),
        Case(207, cat, "tokenizer_config with auto_map remote code", f"refused (exit 2) or ignored; tokenization_evil.py never imported ({no_code})",
             hostile(207, "evil_tok", ("--strategy", "identity"), accept_success=True)),
        Case(208, cat, "model with a malicious pickle pytorch_model.bin", f"refused, pickle not executed ({no_code})", hostile(208, "evil_pickle", ("--strategy", "identity"), accept_success=False)),
        Case(209, cat, "YAML !!python/object/apply in --config", f"refused (exit 2), nothing executed ({no_code})",
             hostile(209, "A", (), accept_success=False, config="y_python_tag.yaml")),
        Case(210, cat, "HTML escaping: <script>/<img onerror> in doc ids, documents, query ids, prompts, completions",
             "no raw <script>/<img> tag in the HTML; the payloads appear escaped", xss),
        Case(211, cat, "file permissions of outputs (umask 022)", "files follow the umask (0644)", modes),
        Case(212, cat, "no world-writable outputs", "none world-writable", world_writable),
    ]


__all__ = ["cases"]
