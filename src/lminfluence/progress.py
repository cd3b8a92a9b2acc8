"""Progress of long passes: a bar on a terminal, a log line at a steady interval elsewhere.

Under a job scheduler, ``nohup`` or a pipe there is no terminal to draw a bar
on; a fit or a scan of a real model would then print nothing for many
minutes. ``progress`` logs "what: done/total (percent), rate, ETA" every
``LOG_INTERVAL`` seconds instead (at INFO, so ``-q`` silences it as it does the bars).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("lminfluence.progress")

LOG_INTERVAL = float(os.environ.get("LMINFLUENCE_PROGRESS_SECONDS", "30"))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LogProgress:
    """The part of tqdm's interface the passes use, writing log lines instead of a bar."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = LOG_INTERVAL) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._log(now)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _log(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n:,}" + (f"/{self.total:,} {self.unit} ({self.n / self.total:.0%})" if self.total else f" {self.unit}")]
        parts.append(f"{rate:,.1f} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        logger.info(", ".join(parts))

    def close(self) -> None:
        pass

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "seq", *, leave: bool = False) -> Any:
    """A tqdm bar when stderr is a terminal (and bars are not disabled), else a ``LogProgress``.

    Under torch.distributed only rank 0 reports progress.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return LogProgress(total, desc, unit, interval=float("inf"))
    if os.environ.get("TQDM_DISABLE") or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=leave)
    return LogProgress(total, desc, unit)


__all__ = ["progress", "LogProgress", "LOG_INTERVAL"]
