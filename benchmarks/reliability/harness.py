"""The harness's primitives: run a command, snapshot a folder, judge an outcome, record a result.

A bad-input case passes when the command exits with status 2, prints exactly one
``lminfluence <command>: error:`` line and no traceback, and leaves every watched
path byte-for-byte as it was (SHA-256 and mode of every file; a path that did not
exist must still not exist). Most commands run in this process through
``lminfluence.cli.main.main(argv)`` (the console script's code path; an exception
that escapes it counts as a traceback with exit status 1, as the script would
report it); crash, concurrency and security cases run the real script.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"
HERE = Path(__file__).resolve().parent


@dataclass
class Outcome:
    """What one command did."""

    rc: int
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stderr

    def error_lines(self, command: str) -> list[str]:
        lines = self.stderr.replace("\r", "\n").splitlines()
        return [line for line in lines if f"lminfluence {command}: error:" in line]

    def tail(self, n: int = 3) -> str:
        lines = [line.strip() for line in self.stderr.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
        return " | ".join(lines[-n:])


@dataclass
class Result:
    """One case's record (a line of results.jsonl)."""

    id: int
    category: str
    case: str
    expected: str
    verdict: str = "FAIL"  # PASS, FAIL or SKIP (the environment cannot run it)
    observed: str = ""
    command: str = ""
    rc: int | None = None
    stderr_tail: str = ""
    changes: list[str] = field(default_factory=list)
    adapted: str = ""  # why the expectation differs from the review's, where it does
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


# ---- running commands ----


def run_cli(argv: list[str]) -> Outcome:
    """``lminfluence ARGV`` in this process, stdout and stderr captured."""
    from lminfluence.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse refusals
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - escaped main(): the script would print a traceback and exit 1
            traceback.print_exc(file=err)
            rc = 1
    return Outcome(rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0)


def script() -> list[str]:
    """The real console script of the environment running the harness."""
    exe = Path(sys.executable).parent / "lminfluence"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "lminfluence"]


def killpoint(at: str, do: str) -> list[str]:
    """The console script wrapped so that it kills, interrupts or pauses itself at ``at`` (see killpoint.py)."""
    return [sys.executable, str(HERE / "killpoint.py"), "--at", at, "--do", do, "--"]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(extra)
    return out


def start(argv: list[str], prefix: list[str] | None = None, **env_extra: str) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or script()), *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**env_extra))


def finish(proc: subprocess.Popen, t0: float, timeout: float = 900) -> Outcome:
    out, err = proc.communicate(timeout=timeout)
    return Outcome(proc.returncode, out, err, time.perf_counter() - t0)


def run_script(argv: list[str], prefix: list[str] | None = None, **env_extra: str) -> Outcome:
    """``lminfluence ARGV`` as a subprocess (the real script, or ``prefix`` instead of it)."""
    t0 = time.perf_counter()
    return finish(start(argv, prefix, **env_extra), t0)


def shown(argv: list[str], prefix: str = "lminfluence") -> str:
    return " ".join([prefix, *(shlex.quote(str(a)) for a in argv)])


# ---- folders ----


def snapshot(path: Path) -> dict[str, tuple[str, int]] | None:
    """Every entry under ``path``: files by SHA-256 and mode, folders by mode; None when ``path`` does not exist."""
    if not path.exists():
        return None
    out: dict[str, tuple[str, int]] = {}
    entries = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    for p in entries:
        rel = "." if p == path else str(p.relative_to(path)) + ("/" if p.is_dir() else "")
        st = p.lstat()
        if p.is_file() and not p.is_symlink():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode & 0o7777)
        else:
            out[rel] = ("dir" if p.is_dir() else "other", st.st_mode & 0o7777)
    return out


def changes(before: dict | None, after: dict | None) -> list[str]:
    """``+`` added, ``-`` removed, ``~`` modified (content or mode)."""
    if before is None and after is None:
        return []
    if before is None:
        return ["created: " + ", ".join(sorted(k for k in after if k != "."))[:300]]
    if after is None:
        return ["removed the whole folder"]
    out = [f"-{k}" for k in sorted(set(before) - set(after))]
    out += [f"+{k}" for k in sorted(set(after) - set(before))]
    out += [f"~{k}" for k in sorted(set(before) & set(after)) if before[k] != after[k]]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def tmp_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*.tmp")) if path.exists() else []


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- judging ----


def refused(o: Outcome, command: str, diff: list[str], mentions: tuple[str, ...] = (), avoid: tuple[str, ...] = ()) -> tuple[bool, str]:
    """The review's bad-input verdict: exit 2, one error line naming the problem, no traceback, nothing changed."""
    errs = o.error_lines(command)
    problems = []
    if o.rc != 2:
        problems.append(f"rc={o.rc}")
    if len(errs) != 1:
        problems.append(f"{len(errs)} error lines")
    if o.traceback:
        problems.append("traceback")
    if diff:
        problems.append("run dir changed")
    text = " ".join(errs).lower()
    missing = [m for m in mentions if m.lower() not in text]
    if errs and missing:
        problems.append(f"message does not name {missing}")
    wrong = [a for a in avoid if a.lower() in text]
    if wrong:
        problems.append(f"message says {wrong}")
    return not problems, "; ".join(problems)


def succeeded(o: Outcome) -> tuple[bool, str]:
    problems = [f"rc={o.rc}"] if o.rc != 0 else []
    if o.traceback:
        problems.append("traceback")
    return not problems, "; ".join(problems)


def observed(o: Outcome, diff: list[str], extra: str = "") -> str:
    text = f"rc={o.rc}; {o.tail()}"
    if diff:
        text += f"; changes: {diff[:8]}"
    return text + (f"; {extra}" if extra else "")


# ---- comparing outputs ----

TABLES = ("queries", "top", "layers", "tokens", "matrix")


def compare_tables(run: Path, ref: Path) -> dict[str, str]:
    """Each score table: bytes-identical, DIFFERENT, or missing on one side."""
    out = {}
    for name in TABLES:
        a, b = run / "scores" / f"{name}.parquet", ref / "scores" / f"{name}.parquet"
        if not a.is_file() or not b.is_file():
            out[name] = f"missing ({'run' if not a.is_file() else 'reference'})" if a.is_file() != b.is_file() else "absent in both"
        else:
            out[name] = "bytes-identical" if a.read_bytes() == b.read_bytes() else "DIFFERENT"
    return out


def tables_ok(cmp: dict[str, str]) -> bool:
    return all(v in ("bytes-identical", "absent in both") for v in cmp.values()) and any(v == "bytes-identical" for v in cmp.values())


def compare_fit(run: Path, ref: Path) -> dict[str, str]:
    """Factor tensors (exactly equal) and the tokenized corpus (bytes) of two fitted runs."""
    from safetensors.torch import load_file

    out = {}
    for rel in ("corpus/sequences.parquet", "corpus/tokens.safetensors"):
        a, b = run / rel, ref / rel
        out[rel] = "bytes-identical" if a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() else "DIFFERENT"
    fa, fb = run / "factors/factors.safetensors", ref / "factors/factors.safetensors"
    if fa.is_file() and fb.is_file():
        ta, tb = load_file(str(fa)), load_file(str(fb))
        same = ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all()) for k in ta)
        out["factors"] = "identical tensors" if same else "DIFFERENT"
    else:
        out["factors"] = "missing"
    return out


def fit_ok(cmp: dict[str, str]) -> bool:
    return all(v in ("bytes-identical", "identical tensors") for v in cmp.values())


def read_table(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


__all__ = [
    "Outcome",
    "Result",
    "run_cli",
    "run_script",
    "start",
    "finish",
    "script",
    "killpoint",
    "shown",
    "snapshot",
    "changes",
    "copy_run",
    "tmp_files",
    "truncate",
    "refused",
    "succeeded",
    "observed",
    "compare_tables",
    "tables_ok",
    "compare_fit",
    "fit_ok",
    "read_table",
]
