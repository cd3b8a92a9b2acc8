"""Atomic writes: a file that exists is complete."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _file_mode() -> int:
    """The mode a new file gets under the process's umask (mkstemp's own is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _os_error_code(error: BaseException) -> int | None:
    """The errno of an error that is not an OSError but says "(os error N)" (safetensors, some Rust writers)."""
    if isinstance(error, OSError):
        return None
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary name in the same folder, then rename it to ``path``.

    The file gets the mode any new file would (the umask decides), so tables meant to be
    shared are readable by whoever may read the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        code = _os_error_code(e)
        if code is not None:  # a writer (safetensors) that reports the OS error as its own type
            raise OSError(code, os.strerror(code), str(path)) from e
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_write_npz(path: str | Path, array: Any = None, **arrays: Any) -> Path:
    """One array as .npy, or named arrays as .npz (numpy's formats, whatever the file name)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array) if array is not None else np.savez(f, **arrays)

    return atomic_write(path, write)


__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_write_npz"]
