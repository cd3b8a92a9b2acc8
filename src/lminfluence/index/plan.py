"""What an index of given factors and settings holds per layer: its codec, fixed tensors, sizes and manifest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..curvature.factors import Factors
from ..errors import ConfigError, CorruptFileError, StaleError
from ..fingerprint import tensors_fingerprint
from .codecs import Codec, make_codec
from .config import IndexConfig
from .store import FORMAT, FORMAT_VERSION, MANIFEST, IndexFiles, Shard, difference, examples_digest, factors_fingerprint

# Strategies whose curvature is diagonal in a per-layer (Kronecker) eigenbasis: what the index stores coordinates in.
SUPPORTED = ("ekfac", "kfac", "diagonal")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def layer_seed(seed: int, name: str) -> int:
    """A generator seed per layer, independent of which other layers are tracked."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


def eigenvalues(factors: Factors, name: str) -> torch.Tensor:
    """Λ [O, I] of one layer, float64 on the CPU."""
    return factors.curvature.state[name]["lambda"].detach().to(device="cpu", dtype=torch.float64)


@dataclass
class IndexPlan:
    """Per tracked layer: the codec, its fixed tensors (``aux``) and the damping its selection used.

    Everything here is derived from the factors and the settings alone, so building and scoring
    reconstruct the same plan; the manifest records a digest of ``aux`` to prove it.
    """

    config: IndexConfig
    codecs: dict[str, Codec]
    aux: dict[str, dict[str, torch.Tensor]]
    selection_damping: dict[str, float]

    @classmethod
    def of(cls, factors: Factors, config: IndexConfig) -> IndexPlan:
        if factors.strategy not in SUPPORTED:
            raise ConfigError(
                f"a gradient index needs a curvature with a per-layer eigenbasis ({', '.join(SUPPORTED)}); "
                f"these factors are {factors.strategy!r}: fit {SUPPORTED[0]} factors"
            )
        codecs: dict[str, Codec] = {}
        aux: dict[str, dict[str, torch.Tensor]] = {}
        damping: dict[str, float] = {}
        for name, info in factors.layers.items():
            codec = make_codec(config.method, info.out_dim, info.in_dim, config.reduction, config.itemsize)
            damping[name] = config.damping_scale * factors.curvature.mean_eigenvalue(name)
            generator = torch.Generator().manual_seed(layer_seed(config.seed, name))
            codecs[name] = codec
            aux[name] = codec.setup(eigenvalues(factors, name), damping[name], generator)
        return cls(config, codecs, aux, damping)

    @property
    def storage_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.config.dtype]

    @property
    def bytes_per_sequence(self) -> int:
        scaled = self.config.dtype == "float16"
        return sum(c.bytes_per_sequence(self.config.itemsize, scaled) for c in self.codecs.values())

    @property
    def full_bytes_per_sequence(self) -> int:
        """The uncompressed per-sequence gradient of the tracked layers at the storage dtype."""
        return sum(c.out_dim * c.in_dim for c in self.codecs.values()) * self.config.itemsize

    @property
    def sequences_per_shard(self) -> int:
        return max(1, int(self.config.shard_mib * 2**20 // max(self.bytes_per_sequence, 1)))

    def aux_digest(self) -> str:
        return tensors_fingerprint((f"{n}::{k}", t) for n, d in self.aux.items() for k, t in sorted(d.items()))

    def manifest(self, factors: Factors) -> dict[str, Any]:
        """The index's manifest: same factors and settings give the same bytes."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "strategy": factors.strategy,
            "model_fingerprint": factors.fingerprint,
            "factors_fingerprint": factors_fingerprint(factors),
            "layers": {
                n: {"out_dim": c.out_dim, "in_dim": c.in_dim, **c.sizes(), "selection_damping": self.selection_damping[n]}
                for n, c in self.codecs.items()
            },
            "aux_digest": self.aux_digest(),
            "bytes_per_sequence": self.bytes_per_sequence,
            "full_bytes_per_sequence": self.full_bytes_per_sequence,
            "sequences_per_shard": self.sequences_per_shard,
        }




class GradientIndex:
    """A finished (or growing) index on disk, opened for scoring.

    Attributes:
        path: its directory.
        manifest: settings, layers and fingerprints (``index.json``).
        shards: the shard files, tiling sequences [0, ``num_sequences``).
    """

    def __init__(self, files: IndexFiles) -> None:
        self.files = files
        self.path = files.path
        self.manifest = files.manifest
        self.shards = files.shards()
        self.num_sequences = files.coverage()

    @classmethod
    def open(cls, path: str | Path) -> GradientIndex:
        """Read the manifest and list the shards; raises InputError/CorruptFileError when there is no usable index."""
        return cls(IndexFiles(path, IndexFiles.read_manifest(path)))

    @property
    def config(self) -> IndexConfig:
        return IndexConfig.from_dict(self.manifest["config"])

    @property
    def bytes_per_sequence(self) -> int:
        return int(self.manifest["bytes_per_sequence"])

    def check(self, factors: Factors) -> IndexPlan:
        """The plan of ``factors``, after checking that the index was built with them (StaleError otherwise)."""
        try:
            plan = IndexPlan.of(factors, self.config)
        except (ConfigError, TypeError) as e:
            raise CorruptFileError(f"{self.path / MANIFEST}: unusable settings ({e}); build the index again") from e
        manifest = plan.manifest(factors)
        if manifest != self.manifest:
            raise StaleError(f"the gradient index at {self.path} was built {difference(self.manifest, manifest)}; build the index again")
        return plan

    def check_examples(self, train: Any) -> None:
        """Refuse training data whose sequences differ from those indexed (StaleError)."""
        from ..scoring.two_stage import subset

        if len(train) < self.num_sequences:
            raise StaleError(f"the gradient index at {self.path} holds {self.num_sequences} sequences but the data has only {len(train)}")
        for shard in self.shards:
            if self.files.shard_metadata(shard)["examples"] != examples_digest(subset(train, range(shard.start, shard.end))):
                raise StaleError(
                    f"sequences {shard.start}..{shard.end - 1} of the data differ from those in the gradient index at {self.path} "
                    "(the corpus changed); build the index again"
                )

    def read(self, shard: Shard, layer: str) -> dict[str, torch.Tensor]:
        return self.files.read(shard, layer)


__all__ = ["IndexPlan", "GradientIndex", "SUPPORTED", "STORAGE_DTYPES", "layer_seed", "eigenvalues"]
