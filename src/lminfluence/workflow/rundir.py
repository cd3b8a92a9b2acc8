"""The run directory: what it holds, whether a new command may write into it, its manifest and logs."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..storage import layout
from ..storage.atomic import atomic_write_json, atomic_write_text
from .config import RunConfig, dump_yaml, read_yaml

logger = logging.getLogger(__name__)

# what each stage depends on: a change in any of these sections makes it another run
STAGE_SECTIONS = {"fit": ("model", "corpus", "fit"), "score": ("model", "corpus", "fit", "score")}
STAGE_OUTPUTS = {
    "fit": (layout.CORPUS_DIR, layout.FACTORS_DIR, layout.SCORES_DIR, layout.REPORT_DIR),
    "score": (layout.SCORES_DIR, layout.REPORT_DIR),
}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    # ---- config ----
    def saved_config(self) -> dict[str, Any] | None:
        p = self / layout.RUN_CONFIG
        return read_yaml(p) if p.is_file() else None

    def prepare(self, stage: str, config: RunConfig, *, overwrite: bool, inputs: dict[str, Any] | None = None) -> None:
        """Refuse to mix two runs in one directory; with ``overwrite``, clear what the stage rewrites.

        A run is its config sections plus ``inputs``, stamps of the files read
        (so a corpus or model edited in place is another run). The same run is
        resumed; another one is refused unless ``overwrite``, which always
        clears this stage's results (and the later stages').
        """
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"run directory {self.path} is a file")
        saved = self.saved_config()
        if saved is None:
            if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
                raise InputError(f"{self.path} is not empty and is not an lminfluence run directory; choose another --run-dir or pass --overwrite")
        else:
            new = config.to_dict()
            diffs = [
                f"{section}.{key}: {saved.get(section, {}).get(key)!r} → {value!r}"
                for section in STAGE_SECTIONS[stage]
                for key, value in (new.get(section) or {}).items()
                if (saved.get(section) or {}).get(key) != value
            ]
            if stage == "score" and not self.finished("score"):
                diffs = [d for d in diffs if not d.startswith("score.")]  # unfinished scores are keyed and resumed or discarded
            recorded = (self.manifest().get("inputs") or {}).get(stage)
            if inputs is not None and recorded is not None:
                diffs += [f"{name} changed on disk" for name, stamp in inputs.items() if recorded.get(name) != stamp]
            if diffs and not overwrite:
                raise InputError(
                    f"{self.path} already holds a different run ({'; '.join(diffs[:4])}); "
                    "choose another --run-dir, or pass --overwrite to replace its results"
                )
            if overwrite:
                for rel in STAGE_OUTPUTS[stage]:
                    shutil.rmtree(self / rel, ignore_errors=True)
                manifest = self.manifest()
                for key in ("fit", "score", "report", "corpus", "inputs") if stage == "fit" else ("score", "report"):
                    manifest.pop(key, None)
                self.write_manifest(manifest)
                logger.info("--overwrite: cleared the previous %s results in %s", stage, self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self / layout.RUN_CONFIG, dump_yaml(config))
        if inputs is not None:
            recorded_all = self.manifest().get("inputs") or {}
            self.update_manifest(inputs={**recorded_all, stage: inputs})
        logger.info("run directory %s ready for %s", self.path, stage, extra={"run_dir_ready": True})

    # ---- manifest ----
    def manifest(self) -> dict[str, Any]:
        import json

        p = self / layout.RUN_MANIFEST
        return json.loads(p.read_text()) if p.is_file() else {"format_version": layout.FORMAT_VERSION}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        if self.path.is_dir():
            atomic_write_json(self / layout.RUN_MANIFEST, manifest)

    def update_manifest(self, **entries: Any) -> dict[str, Any]:
        manifest = self.manifest()
        manifest.update(entries)
        self.write_manifest(manifest)
        return manifest

    def finished(self, stage: str) -> bool:
        return stage in self.manifest()


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


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"lminfluence": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


__all__ = ["RunDir", "now", "versions", "file_stamp"]
