"""Every error type the library raises on purpose, and the exit status each one means.

Errors a user can cause (bad input, a changed model, a corrupt file, a busy run
directory) derive from ``InputError``, a ``ValueError``: the message names what
is wrong and how to fix it, and the command line exits with status 2 after
printing it on one line. Errors about numbers the library refuses to return
(a diverging LiSSA series, a PBRF solve that did not converge) exit with 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LminfluenceError(Exception):
    """Base class; ``exit_status`` is what the command line returns for it."""

    exit_status = 1


class InputError(LminfluenceError, ValueError):
    """Bad user input: the message says what is wrong and how to fix it."""

    exit_status = 2


class ConfigError(InputError):
    """An option has a value it cannot take (the message names the option)."""


class StaleError(InputError):
    """Something an earlier stage used has changed since (model, tokenizer, corpus, factors)."""


class CorruptFileError(InputError):
    """A file that lminfluence wrote cannot be read back (truncated, or from another format)."""


class BusyError(InputError):
    """Another lminfluence command is writing into the same run directory."""


class TrackingError(LminfluenceError, RuntimeError):
    """A tracked layer was used in a way influence tracking cannot follow."""

    exit_status = 2


class LissaDivergenceError(LminfluenceError, FloatingPointError):
    """The LiSSA recursion grew without bound: the scale α is too large for the curvature."""


class RefinementError(LminfluenceError, FloatingPointError):
    """Conjugate-gradient refinement met a direction of non-positive curvature: (G + λI) is not positive definite in this precision."""


class PBRFConvergenceError(LminfluenceError, RuntimeError):
    """Adam did not reach the gradient-norm tolerance within max_steps."""


def exit_status(error: BaseException) -> int | None:
    """The command line's exit status for ``error``; None for an unexpected error (a bug: keep the traceback).

    OSError (a read-only directory, a full disk, a missing permission) is the
    environment's answer to a request the user made: status 2 with its message.
    """
    if isinstance(error, LminfluenceError):
        return error.exit_status
    if isinstance(error, OSError):
        return 2
    if isinstance(error, KeyboardInterrupt):
        return 130
    return None


def describe(error: BaseException) -> str:
    """A one-line message for ``error`` (OSError gets its reason and file, not its class name)."""
    if isinstance(error, OSError) and not isinstance(error, LminfluenceError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return " ".join(str(error).split()) or type(error).__name__


__all__ = [
    "LminfluenceError",
    "InputError",
    "ConfigError",
    "StaleError",
    "CorruptFileError",
    "BusyError",
    "TrackingError",
    "LissaDivergenceError",
    "RefinementError",
    "PBRFConvergenceError",
    "exit_status",
    "describe",
]
