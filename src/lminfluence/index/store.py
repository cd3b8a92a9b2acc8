"""The index on disk: a manifest and append-only shards of compressed gradients.

Layout of an index directory::

    index.json                      settings, layers, fingerprints (model, factors), written first
    shards/0000000000-0000000256.safetensors   sequences [start, end): per layer "<layer>::<array>",
                                    metadata: range, digest of the sequences' tokens, CRC-32 per tensor

Every file is written under a temporary name and renamed when complete, so a
shard that exists is whole. Shards tile the sequence range [0, N): sequence
positions are cut into cells of ``sequences_per_shard``; a build fills each
cell's missing part, and the process of rank r of W builds the cells c with
c mod W = r, so that ranks never write the same file. Appending sequences adds
shards after the last; nothing written is ever rewritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..curvature.factors import Factors
from ..errors import CorruptFileError, InputError, StaleError
from ..storage.atomic import atomic_write, atomic_write_json

FORMAT = "lminfluence-gradient-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
SHARD_DIR = "shards"
_SHARD_NAME = re.compile(r"^(\d{10})-(\d{10})\.safetensors$")


def _leftover(p: Path) -> bool:
    """What a build killed before its manifest was in place can leave: the manifest's temporary file, an empty shards folder."""
    if p.name == SHARD_DIR and p.is_dir():
        return not any(p.iterdir())
    return p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp")


def remove_temporary_files(path: str | Path) -> None:
    """Delete the temporary files killed writes left (call only when no other process writes into the index)."""
    path = Path(path)
    for tmp in [*path.glob(f".{MANIFEST}.*.tmp"), *(path / SHARD_DIR).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)


def shard_name(start: int, end: int) -> str:
    """The file name of the shard of sequences [start, end)."""
    return f"{start:010d}-{end:010d}.safetensors"


def examples_digest(examples: Iterable[Mapping[str, Any]]) -> str:
    """A hash of the token ids (and labels and attention masks, when given) of some examples, in order."""
    h = hashlib.sha256()
    for ex in examples:
        for key in ("input_ids", "labels", "attention_mask"):
            value = ex.get(key)
            if value is not None:
                t = torch.as_tensor(value).to(torch.int64).reshape(-1)
                h.update(f"{key}:{t.numel()}|".encode())
                h.update(t.numpy().tobytes())
        h.update(b";")
    return h.hexdigest()[:32]


def factors_fingerprint(factors: Factors) -> str:
    """Identifies fitted factors.

    Their model's fingerprint, strategy, settings, counts, and a strided sample
    of every tensor (4096 values each; any refit on other data or settings changes it, at little cost).
    """
    h = hashlib.sha256()
    h.update(json.dumps([factors.fingerprint, factors.strategy, factors.config.to_dict(), factors.num_tokens, factors.num_sequences]).encode())
    for key, t in sorted(factors.curvature.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{key}|{tuple(t.shape)}|".encode())
        h.update(flat[::step].to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return h.hexdigest()[:32]


def difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """How two manifests differ, the most basic difference first ("for another model", "with other settings: …")."""
    if old.get("model_fingerprint") != new.get("model_fingerprint"):
        return "for another model"
    if old.get("factors_fingerprint") != new.get("factors_fingerprint"):
        return "with other factors (refitted since?)"
    if old.get("config") != new.get("config"):
        a, b = old.get("config") or {}, new.get("config") or {}
        return "with other settings: " + ", ".join(f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return f"by another lminfluence or torch version (its {', '.join(keys)} differ)"


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (read in place: no copy)."""
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


@dataclass(frozen=True)
class Shard:
    """One shard file: sequences [start, end)."""

    start: int
    end: int
    path: Path

    @property
    def size(self) -> int:
        return self.end - self.start


class IndexFiles:
    """Reading and writing an index directory (no knowledge of what the arrays mean)."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._verified: set[tuple[str, str]] = set()  # (shard file, tensor) whose CRC was checked

    # ---- the manifest ----
    @classmethod
    def read_manifest(cls, path: str | Path) -> dict[str, Any]:
        p = Path(path) / MANIFEST
        if not p.is_file():
            raise InputError(f"no gradient index at {path}: {MANIFEST} is missing (build one with build_index / `lminfluence index`)")
        try:
            manifest = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{p} is damaged ({e}); delete the index directory and build it again") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CorruptFileError(f"{p} is not a gradient index manifest; delete the index directory and build it again")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(
                f"{p}: index format {manifest.get('format_version')} is not {FORMAT_VERSION} (another lminfluence version); build the index again"
            )
        return manifest

    @classmethod
    def create(cls, path: str | Path, manifest: dict[str, Any]) -> IndexFiles:
        """Open ``path`` for building with ``manifest``: written if absent, else it must be the same (StaleError)."""
        path = Path(path)
        if (path / MANIFEST).is_file():
            old = cls.read_manifest(path)
            if old != manifest:
                raise StaleError(f"the gradient index at {path} was built {difference(old, manifest)}; delete it or build into another directory")
        elif path.exists() and (not path.is_dir() or any(not _leftover(p) for p in path.iterdir())):
            raise InputError(f"{path} exists and is not a gradient index; choose another directory for the index")
        else:
            atomic_write_json(path / MANIFEST, manifest)
        (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        return cls(path, manifest)

    # ---- shards ----
    def shards(self) -> list[Shard]:
        """The finished shards, by start (temporary files of an interrupted write are not shards)."""
        root = self.path / SHARD_DIR
        found = []
        for f in root.iterdir() if root.is_dir() else ():
            m = _SHARD_NAME.match(f.name)
            if m:
                start, end = int(m.group(1)), int(m.group(2))
                if end <= start:
                    raise CorruptFileError(f"{f}: a shard of no sequences; delete it and run the build again")
                found.append(Shard(start, end, f))
        return sorted(found, key=lambda s: (s.start, s.end))

    def coverage(self) -> int:
        """N, the number of sequences indexed; the shards must tile [0, N) without gap or overlap."""
        end = 0
        for s in self.shards():
            if s.start != end:
                what = "overlaps the shard before it" if s.start < end else f"follows a gap: sequences {end}..{s.start - 1} are missing"
                raise CorruptFileError(
                    f"gradient index {self.path}: shard {s.path.name} {what} (an unfinished or mixed build); "
                    "run the build again to fill it, or delete the index"
                )
            end = s.end
        return end

    def write_shard(self, start: int, end: int, tensors: dict[str, torch.Tensor], examples: str) -> Shard:
        """Write sequences [start, end) atomically; ``tensors`` maps "<layer>::<array>" to [end - start, ...]."""
        tensors = {k: t.contiguous() for k, t in tensors.items()}
        meta = {"start": start, "end": end, "examples": examples, "crc32": {k: crc32(t) for k, t in sorted(tensors.items())}}
        path = self.path / SHARD_DIR / shard_name(start, end)
        # one metadata entry: safetensors writes its metadata map in no fixed order, the bytes must not vary
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"index": json.dumps(meta, sort_keys=True)}))
        return Shard(start, end, path)

    @staticmethod
    def _metadata(shard: Shard, raw: dict[str, str] | None) -> dict[str, Any]:
        try:
            meta = json.loads((raw or {})["index"])
            if meta["start"] == shard.start and meta["end"] == shard.end and isinstance(meta["crc32"], dict):
                return meta
        except (KeyError, TypeError, json.JSONDecodeError):
            pass
        raise CorruptFileError(f"gradient index shard {shard.path} does not hold what its name says; delete it and run the build again")

    def shard_metadata(self, shard: Shard) -> dict[str, Any]:
        """The shard's range, the digest of its sequences (``examples``) and its tensors' CRC-32."""
        try:
            with safe_open(str(shard.path), framework="pt") as f:
                raw = f.metadata()
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptFileError(f"gradient index shard {shard.path} cannot be read ({e}); delete it and run the build again") from e
        return self._metadata(shard, raw)

    def read(self, shard: Shard, layer: str) -> dict[str, torch.Tensor]:
        """One layer's arrays of a shard, each checked against its CRC-32 (once per process)."""
        prefix = f"{layer}::"
        try:
            with safe_open(str(shard.path), framework="pt") as f:
                crcs = self._metadata(shard, f.metadata())["crc32"]
                out = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptFileError(f"gradient index shard {shard.path} cannot be read ({type(e).__name__}: {e}); delete it and run the build again") from e
        if not out:
            raise CorruptFileError(f"gradient index shard {shard.path} has no arrays of layer {layer!r}; delete it and run the build again")
        for key, t in out.items():
            tag = (shard.path.name, prefix + key)
            if tag in self._verified:
                continue
            if t.shape[0] != shard.size or crcs.get(prefix + key) != crc32(t):
                raise CorruptFileError(
                    f"gradient index shard {shard.path} is damaged ({prefix + key} fails its checksum); delete it and run the build again"
                )
            self._verified.add(tag)
        return out


__all__ = ["IndexFiles", "Shard", "examples_digest", "factors_fingerprint", "shard_name", "MANIFEST", "SHARD_DIR", "FORMAT", "FORMAT_VERSION"]
