"""The run directory: its stages declared once, a lock, staged outputs swapped in whole, the manifest.

A stage (``STAGES``) names the config sections whose change makes it another
run, the outputs it writes and the stages whose results it makes stale.
Outputs are built under ``RUN/staging/<stage>/`` and moved into place only
when the stage has finished (``commit``): an interrupted or refused command
never loses earlier results, and a rerun of the same command resumes from
what the staging area holds. One command at a time writes into a run
directory (``lock``); a second one is refused at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import BusyError, CorruptFileError, InputError
from ..storage import layout
from ..storage.atomic import atomic_write_json, atomic_write_text
from .config import RunConfig, dump_yaml, read_yaml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """What a stage depends on, writes and invalidates."""

    name: str
    sections: tuple[str, ...]  # config sections whose change makes it another run
    outputs: tuple[str, ...]  # relative paths it writes
    downstream: tuple[str, ...]  # stages made stale when it is redone


STAGES: dict[str, Stage] = {
    "fit": Stage("fit", ("model", "corpus", "fit"), (layout.CORPUS_DIR, layout.FACTORS_DIR), ("index", "score", "analysis", "report")),
    # scores made through the index carry its identity in their key: a rebuilt index makes them out of date, not deleted
    "index": Stage("index", ("model", "corpus", "fit", "index"), (layout.INDEX_DIR,), ()),
    "score": Stage("score", ("model", "corpus", "fit", "score"), (layout.SCORES_DIR,), ("analysis", "report")),
    "analysis": Stage("analysis", (), (layout.ANALYSIS_DIR,), ("report",)),
    "report": Stage("report", (), (layout.REPORT_DIR,), ()),
}


def now() -> str:
    """The UTC time, as run.json records it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# options of how a stage runs, which change none of its results (Execution's fields, the scan's chunk size)
EXECUTION_KEYS = frozenset(
    {"batch_size", "query_batch_size", "cache_gib", "chunk_size", "memory_gib", "checkpoint_seconds", "offload_factors", "factor_placement"}
)


class RunDir:
    """A run directory: what it holds (config, manifest, stages), its lock, and the staging of a stage's outputs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    # ---- what is there ----
    def saved_config(self) -> dict[str, Any] | None:
        """config.yaml as a dict, None when there is none; a damaged one is a CorruptFileError."""
        p = self / layout.RUN_CONFIG
        if not p.is_file():
            return None
        try:
            return read_yaml(p)
        except InputError as e:
            raise CorruptFileError(f"{e}; it is damaged: delete the run directory or pass --overwrite") from e

    def manifest(self) -> dict[str, Any]:
        p = self / layout.RUN_MANIFEST
        if not p.is_file():
            return {"format_version": layout.FORMAT_VERSION}
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{p} is damaged ({e}): delete the run directory or pass --overwrite") from e
        if not isinstance(data, dict):
            raise CorruptFileError(f"{p} is damaged (not a JSON object): delete the run directory or pass --overwrite")
        return data

    def finished(self, stage: str) -> dict[str, Any] | None:
        """The manifest's entry of a finished stage, or None."""
        entry = self.manifest().get(stage)
        return entry if isinstance(entry, dict) else None

    def is_run(self) -> bool:
        return (self / layout.RUN_MANIFEST).is_file() or (self / layout.RUN_CONFIG).is_file() or (self / layout.STAGING_DIR).is_dir()

    def check_usable(self, *, overwrite: bool) -> None:
        """Refuse a path that is a file, or a non-empty folder that is not a run directory (unless ``overwrite``)."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"run directory {self.path} is a file")
        if self.path.is_dir() and not self.is_run() and any(self.path.iterdir()) and not overwrite:
            raise InputError(f"{self.path} is not empty and is not an lminfluence run directory; choose another --run-dir or pass --overwrite")

    def differences(self, stage: str, config: RunConfig) -> list[str]:
        """How ``config`` differs from the finished run of ``stage`` (execution settings aside: they change no result)."""
        saved = self.saved_config() or {}
        new = config.to_dict()
        ignore = EXECUTION_KEYS
        return [
            f"{section}.{key}: {(saved.get(section) or {}).get(key)!r} → {value!r}"
            for section in STAGES[stage].sections
            for key, value in (new.get(section) or {}).items()
            if key not in ignore and (saved.get(section) or {}).get(key) != value
        ]

    # ---- writing ----
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for one command; another command asking for it is refused (BusyError)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self / layout.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusyError(f"another lminfluence command is writing into {self.path}; wait for it to finish, or use another --run-dir") from None
            logger.info("run directory %s ready", self.path, extra={"run_dir_ready": True})
            yield
        finally:
            os.close(fd)  # closing releases the lock (so does the process dying)

    def staging(self, stage: str, key: str) -> Path:
        """The staging folder of ``stage`` for the run ``key``; what another run left there is discarded."""
        root = self / layout.STAGING_DIR / stage
        key_file = root / "key.json"
        if root.is_dir():
            try:
                old = json.loads(key_file.read_text()).get("key") if key_file.is_file() else None
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                old = None
            if old != key:
                logger.info("discarding unfinished %s results of another configuration in %s", stage, root)
                _remove(root)
        root.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            atomic_write_json(key_file, {"key": key})
        return root

    def invalidate(self, stage: str, manifest: dict[str, Any]) -> None:
        """Remove the outputs and manifest entries of ``stage``'s downstream stages (the stage's own are replaced)."""
        for name in STAGES[stage].downstream:
            for rel in STAGES[name].outputs:
                _remove(self / rel)
            manifest.pop(name, None)

    def commit(self, stage: str, config: RunConfig | None, entry: dict[str, Any], **manifest_entries: Any) -> None:
        """Move the staged outputs of ``stage`` into place, make later stages stale, record the stage as finished.

        The order keeps every crash point consistent: until run.json names the new run, the old
        outputs are either intact or already removed together with their manifest entries.
        """
        root = self / layout.STAGING_DIR / stage
        manifest = self.manifest()
        manifest.pop(stage, None)
        self.invalidate(stage, manifest)
        self.write_manifest(manifest)  # from here on nothing claims the old outputs
        for rel in STAGES[stage].outputs:
            staged = root / rel
            if staged.exists():
                _remove(self / rel)
                (self / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, self / rel)
        if config is not None:
            atomic_write_text(self / layout.RUN_CONFIG, dump_yaml(config))
        manifest.update(manifest_entries)
        manifest["format_version"] = layout.FORMAT_VERSION
        manifest[stage] = {**entry, "finished": now()}
        self.write_manifest(manifest)
        _remove(root)
        staging = self / layout.STAGING_DIR
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self / layout.RUN_MANIFEST, manifest)

    def update_manifest(self, **entries: Any) -> dict[str, Any]:
        manifest = self.manifest()
        manifest.update(entries)
        self.write_manifest(manifest)
        return manifest


def file_stamp(*paths: str | Path) -> str:
    """A digest of the names, sizes and modification times of the files at ``paths`` (folders: every file below)."""
    import hashlib

    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def digest(*parts: Any) -> str:
    """A short hash of JSON-able parts (numpy arrays by their bytes)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """The versions of lminfluence, torch and transformers, as run.json records them."""
    import torch
    import transformers

    from .. import __version__

    return {"lminfluence": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


__all__ = ["RunDir", "Stage", "STAGES", "now", "versions", "file_stamp", "digest"]
