"""The command line's logging: messages to stderr, and each command's log in RUN/logs/ once the run directory is ours."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..storage import layout

logger = logging.getLogger("lminfluence")


class DeferredFileHandler(logging.Handler):
    """Logs into RUN/logs/<command>.log, holding records back until the run directory passed its checks.

    It opens once a record marked ``run_dir_ready`` arrives (``RunDir.lock`` logs one), so
    a command refused for bad input leaves no log behind in somebody's directory.
    """

    def __init__(self, run_dir: Path, command: str, *, ready: bool = False) -> None:
        super().__init__()
        self.path = run_dir / layout.LOG_DIR / f"{command}.log"
        self.ready = ready
        self.pending: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.pending.append(record)
        self.ready = self.ready or bool(getattr(record, "run_dir_ready", False))
        if self.ready:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    for r in self.pending:
                        f.write(self.format(r) + "\n")
            except OSError:  # a log that cannot be written (read-only or full disk) must not end the command
                self.ready = False
                self.emit = lambda record: None  # type: ignore[method-assign]
            self.pending.clear()


def attach_log(run_dir: str | Path, command: str, *, ready: bool = False) -> None:
    """Send the command's log records to RUN/logs/<command>.log (held back until the directory is ready)."""
    logger.addHandler(DeferredFileHandler(Path(run_dir).expanduser().resolve(), command, ready=ready))


def _hf_progress_bars(enable: bool | None) -> bool:
    """Whether transformers draws its own bars (loading weights); set it when ``enable`` is not None."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if enable is True:
        hf_logging.enable_progress_bar()
    elif enable is False:
        hf_logging.disable_progress_bar()
    return was


def silence(handler: logging.Handler | None = None) -> None:
    """Warnings only, and no progress bar (ours, tqdm's, transformers'): for -q, and for ranks other than 0.

    ``command_logging`` undoes it when the command ends.
    """
    for h in [handler] if handler is not None else [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
        h.setLevel(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    _hf_progress_bars(False)


@contextmanager
def command_logging(quiet: bool) -> Iterator[None]:
    """Messages to stderr (warnings only with ``quiet``, bars off too); every handler added is removed on exit."""
    handlers = list(logger.handlers)
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    level = logger.level
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    hf_bars = _hf_progress_bars(None)
    if quiet:
        silence(handler)
    try:
        yield
    finally:  # leave the process as it was (tests and notebooks call main() many times)
        _hf_progress_bars(hf_bars)
        for h in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(level)
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)


__all__ = ["DeferredFileHandler", "attach_log", "command_logging", "silence"]
