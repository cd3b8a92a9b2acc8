#!/usr/bin/env python
"""Run ``lminfluence ARGS`` and kill, interrupt or pause it at an exact point of its work.

Usage::

    python killpoint.py --at chunks:2 --do kill -- score -o RUN --queries q.jsonl

Points (``--at``), each reached at most once:

    tokenized         the tokenized corpus was written to the staging area (fit)
    covariance:N      N batches of the covariance pass were accumulated (fit)
    correction:N      N batches of EK-FAC's eigenvalue-correction pass were accumulated (fit)
    factors-saved     the factors were written to the staging area, before they are moved into place (fit)
    factors-in-place  RUN/factors was moved into place, before run.json records the fit
    chunks:N          N chunk files of the scan/re-score/details were written (score)
    details           the first chunk of the details phase was written (score)
    tables:N          N of the score tables were written (score)
    scores-in-place   RUN/scores was moved into place, before run.json records the scores

Actions (``--do``): ``kill`` (SIGKILL to itself: the same as ``kill -9``, nothing runs after it),
``int`` (SIGINT, as Ctrl-C), ``pause:S`` (sleep S seconds, then carry on). When the point is
reached, the file named by $KILLPOINT_REACHED (if set) is created first. The hooks wrap library
functions from outside; a hook whose target no longer exists ends the run with status 99, so a
refactoring of the library shows up as a harness error, never as a case that passes unchecked.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _fire(action: str) -> None:
    reached = os.environ.get("KILLPOINT_REACHED")
    if reached:
        Path(reached).touch()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif action.startswith("pause:"):
        time.sleep(float(action.split(":", 1)[1]))
    else:
        raise SystemExit(f"killpoint: unknown action {action!r}")


class Counter:
    def __init__(self, target: int, action: str) -> None:
        self.n, self.target, self.action, self.done = 0, target, action, False

    def step(self) -> None:
        self.n += 1
        if not self.done and self.n >= self.target:
            self.done = True
            _fire(self.action)


def _after(owner: object, name: str, counter: Counter, when=lambda *a, **k: True) -> None:
    """Wrap ``owner.name`` so that each call for which ``when(args)`` holds steps the counter after it returns."""
    real = getattr(owner, name, None)
    if real is None:
        raise SystemExit(f"killpoint: cannot hook {owner!r}.{name}: the library changed; update killpoint.py")

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if when(*args, **kwargs):
            counter.step()
        return out

    setattr(owner, name, wrapped)


def _batches(owner: object, name: str, counter: Counter, when) -> None:
    """Wrap a generator function so that each batch it yields (and the caller consumed) steps the counter."""
    real = getattr(owner, name, None)
    if real is None:
        raise SystemExit(f"killpoint: cannot hook {owner!r}.{name}: the library changed; update killpoint.py")

    def wrapped(*args, **kwargs):
        for item in real(*args, **kwargs):
            yield item
            if when(*args, **kwargs):
                counter.step()

    setattr(owner, name, wrapped)


def install(at: str, action: str) -> None:
    import lminfluence.corpus.sequences as sequences
    import lminfluence.curvature.factors as factors
    import lminfluence.fitting as fit
    import lminfluence.workflow.rundir as rundir
    import lminfluence.workflow.scoring as scoring
    import lminfluence.workflow.tables as tables

    point, _, arg = at.partition(":")
    counter = Counter(int(arg) if arg else 1, action)
    if point == "tokenized":
        _after(sequences.SequenceStore, "save", counter)
    elif point in ("covariance", "correction"):
        _batches(fit, "run_pass", counter, lambda *a, **k: k.get("desc", "").endswith(point))
        if point == "correction":
            _batches(fit.CaptureCache, "replay", counter, lambda *a, **k: True)
    elif point == "factors-saved":
        _after(factors.Factors, "save", counter)
    elif point in ("factors-in-place", "scores-in-place"):
        folder = point.split("-")[0]
        _after(rundir.os, "replace", counter, lambda src, dst, *a, **k: Path(dst).name == folder)
    elif point == "chunks":
        _after(scoring.DiskStore, "put", counter)
    elif point == "details":
        _after(scoring.DiskStore, "put", counter, lambda self, name, *a, **k: name.startswith("details"))
    elif point == "tables":
        _after(tables, "_write", counter)
    else:
        raise SystemExit(f"killpoint: unknown point {at!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at", required=True)
    parser.add_argument("--do", required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    install(opts.at, opts.do)
    from lminfluence.cli.main import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
