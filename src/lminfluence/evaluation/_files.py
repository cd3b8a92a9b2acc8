"""Settings checks and atomic writes for the resumable ground-truth directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..storage.atomic import atomic_write_json as write_json
from ..storage.atomic import atomic_write_npz


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_npz(path: Path, **arrays: Any) -> None:
    atomic_write_npz(path, **arrays)


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
