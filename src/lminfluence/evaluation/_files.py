"""Atomic JSON and npz writes for the resumable ground-truth directories."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    atomic_write(path, write)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def check_settings(path: Path, settings: dict[str, Any], what: str) -> None:
    """Write ``settings`` to ``path``, or refuse when a previous run left different ones there."""
    if path.is_file():
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{path.parent} holds {what} computed with other settings ({', '.join(diff)} differ); "
                "use a new output_dir, or the same settings to resume"
            )
    else:
        write_json(path, settings)
