#!/usr/bin/env python
"""Re-run the 212 cases of the reliability review against the current code; write results.jsonl and summary.md.

Usage (from the repository root; about 20 minutes on a shared 2-core machine)::

    nice -n 10 .venv/bin/python benchmarks/reliability/run.py                  # every case, into runs/reliability/
    nice -n 10 .venv/bin/python benchmarks/reliability/run.py --only 1-40 137  # some cases
    nice -n 10 .venv/bin/python benchmarks/reliability/run.py --work /tmp/rel --big-mb 1

Read-only folders and full disks need mounts: the harness re-runs itself in a private mount
namespace (``unshare``; as root, or through a user namespace otherwise), so nothing it mounts is
seen outside it or outlives it. Where that is impossible those cases are reported as SKIP.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
NAMESPACE_FLAG = "LMINFLUENCE_RELIABILITY_NS"


def _in_namespace() -> None:
    """Re-execute this script inside a private mount namespace (once); return if that cannot be done."""
    if os.environ.get(NAMESPACE_FLAG) or shutil.which("unshare") is None:
        return
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    prefix = ["unshare", *user, "--mount", "--propagation", "private"]
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        return
    env = {**os.environ, NAMESPACE_FLAG: "1"}
    os.execvpe(prefix[0], [*prefix, sys.executable, *sys.argv], env)


def _ids(specs: list[str]) -> set[int]:
    out: set[int] = set()
    for spec in specs:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _environment(work: Path) -> None:
    """Offline, caches inside WORK, two threads (the determinism cases compare 1 against 2)."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(work / "hf-home"))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ["TQDM_DISABLE"] = "1"


def all_cases() -> list:
    import cases_api
    import cases_crash
    import cases_env
    import cases_input
    import cases_security
    import cases_stale

    found = [*cases_input.cases(), *cases_env.cases(), *cases_crash.cases(), *cases_stale.cases(), *cases_api.cases(), *cases_security.cases()]
    return sorted(found, key=lambda c: c.id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/reliability", help="inputs, runs and results (default runs/reliability)")
    parser.add_argument("--only", nargs="*", default=[], help="case numbers or ranges, e.g. 1-40 137")
    parser.add_argument("--big-mb", type=float, default=10.0, help="size of the single-document corpus of case 23 (default 10 MB)")
    parser.add_argument("--keep", action="store_true", help="keep every case's folder (default: only the failing cases')")
    args = parser.parse_args()
    # A shell that starts this in the background (`cmd &`, nohup) ignores SIGINT, and ignored signals are
    # inherited: the Ctrl-C cases (141, 142) would then test nothing. A handler here makes children start with SIGINT's default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _in_namespace()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _environment(work)
    sys.path.insert(0, str(HERE))

    from cases import Ctx
    from cases_env import can_mount
    from harness import Result
    from inputs import build, markers_created
    from summary import write_summary

    t0 = time.perf_counter()
    print(f"building the inputs in {work / 'inputs'} …", flush=True)
    paths = build(work, big_mb=args.big_mb)
    # mounts only inside the private namespace: none may leak to the machine if the harness is killed
    ctx = Ctx(work, paths, bool(os.environ.get(NAMESPACE_FLAG)) and can_mount(work))
    if not ctx.can_mount:
        print("no private mount namespace: the read-only and full-disk cases are skipped", flush=True)
    chosen = _ids(args.only) if args.only else None
    selected = [c for c in all_cases() if chosen is None or c.id in chosen]
    results_path = work / "results.jsonl"
    results = []
    with open(results_path, "w", encoding="utf-8") as out:
        for case in selected:
            result = Result(case.id, case.category, case.name, case.expected, adapted=case.adapted)
            start = time.perf_counter()
            if case.needs_mount and not ctx.can_mount:
                result.verdict, result.observed = "SKIP", "needs a private mount namespace (unshare) to make read-only folders and full disks"
            else:
                try:
                    case.run(ctx, result)
                except Exception as e:  # noqa: BLE001 - a harness error fails the case, it never passes it
                    result.verdict = "FAIL"
                    result.observed = f"harness error: {type(e).__name__}: {e}"
                    result.stderr_tail = traceback.format_exc()[-1500:]
            result.seconds = round(time.perf_counter() - start, 1)
            results.append(result)
            out.write(result.to_json() + "\n")
            out.flush()
            print(f"#{case.id:<3} {result.verdict:4} {result.seconds:6.1f}s  {case.name}" + ("" if result.verdict != "FAIL" else f"\n      {result.observed[:300]}"), flush=True)
            if result.verdict == "PASS" and not args.keep:
                shutil.rmtree(work / "cases" / f"{case.id:03d}", ignore_errors=True)
    markers = markers_created(paths)
    summary = write_summary(work / "summary.md", results, markers=markers, seconds=time.perf_counter() - t0)
    print(f"\n{summary}\nresults: {results_path}\nsummary: {work / 'summary.md'}")
    return 0 if all(r.verdict != "FAIL" for r in results) and not markers else 1


if __name__ == "__main__":
    sys.exit(main())
