"""The configuration of a run: one validated dataclass per section, saved as RUN/config.yaml.

Precedence: defaults < a YAML file (``--config``) < command-line flags. Paths
are stored absolute, so a saved config replays from any working directory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ALGORITHMS, FISHER_TYPES, STRATEGIES, check_choice, check_positive_int
from ..errors import InputError

DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


class _Section:
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str):
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: {e}") from e


@dataclass(frozen=True)
class ModelSection(_Section):
    """path: a Hugging Face model folder, or a .gguf file; tokenizer: another folder for it."""

    path: str = ""
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("model.path is required (--model)")
        check_choice("model.dtype", self.dtype, DTYPES)
        path = Path(self.path).expanduser()
        gguf = self.gguf_file
        if gguf is None and path.suffix == ".gguf":  # a .gguf file given as the model: split folder and file
            path, gguf = path.parent, path.name
        object.__setattr__(self, "path", _abs(str(path)))
        object.__setattr__(self, "gguf_file", gguf)
        object.__setattr__(self, "tokenizer", _abs(self.tokenizer))


@dataclass(frozen=True)
class CorpusSection(_Section):
    path: str = ""
    text_field: str = "text"
    id_field: str = "id"
    max_length: int = 512

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("corpus.path is required (--corpus)")
        object.__setattr__(self, "path", _abs(self.path))
        check_positive_int("corpus.max_length", self.max_length)
        if self.max_length < 2:
            raise ValueError("corpus.max_length must be ≥ 2")


@dataclass(frozen=True)
class FitSection(_Section):
    strategy: str = "ekfac"
    fisher: str = "sampled"
    modules: tuple[str, ...] | None = None
    seed: int = 0
    batch_size: int = 8
    cache_gib: float = 4.0
    lissa_scale: float | None = None
    lissa_depth: int = 1000
    lissa_repeats: int = 1
    lissa_batch_size: int = 8

    def __post_init__(self) -> None:
        check_choice("fit.strategy", self.strategy, STRATEGIES)
        check_choice("fit.fisher", self.fisher, FISHER_TYPES)
        if isinstance(self.modules, str):
            object.__setattr__(self, "modules", tuple(m.strip() for m in self.modules.split(",") if m.strip()))
        elif self.modules is not None:
            object.__setattr__(self, "modules", tuple(self.modules))
        check_positive_int("fit.batch_size", self.batch_size)
        if not (isinstance(self.cache_gib, (int, float)) and self.cache_gib >= 0):
            raise ValueError(f"fit.cache_gib must be ≥ 0, got {self.cache_gib!r}")


@dataclass(frozen=True)
class ScoreSection(_Section):
    """How queries are scored; see `lminfluence score --help` for each option."""

    queries: str = ""
    candidates: int | None = None
    rank: int | None = None
    rescore_top: int | None = None
    top: int = 10
    damping_scale: float | None = 0.1
    damping: float | None = None
    batch_size: int = 8
    query_batch_size: int = 16
    chunk_size: int = 1024
    algorithm: str = "auto"
    save_matrix: bool = False

    def __post_init__(self) -> None:
        if not self.queries:
            raise ValueError("score.queries is required (--queries)")
        object.__setattr__(self, "queries", _abs(self.queries))
        check_positive_int("score.candidates", self.candidates, allow_none=True)
        check_positive_int("score.rank", self.rank, allow_none=True)
        check_positive_int("score.rescore_top", self.rescore_top, allow_none=True)
        check_positive_int("score.top", self.top)
        for name in ("batch_size", "query_batch_size", "chunk_size"):
            check_positive_int(f"score.{name}", getattr(self, name))
        check_choice("score.algorithm", self.algorithm, ALGORITHMS)
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"score.damping must be a finite number ≥ 0, got {self.damping!r}")
        if self.rescore_top is not None and self.rank is None:
            raise ValueError("score.rescore_top re-scores a low-rank scan at full rank: it needs score.rank")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run directory was made with. ``score`` is None until a score command ran."""

    run_dir: str
    model: ModelSection
    corpus: CorpusSection
    fit: FitSection = field(default_factory=FitSection)
    score: ScoreSection | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_dir": self.run_dir, "model": self.model.to_dict(), "corpus": self.corpus.to_dict(), "fit": self.fit.to_dict()}
        if self.score is not None:
            out["score"] = self.score.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "RunConfig":
        unknown = sorted(set(data) - {"run_dir", "model", "corpus", "fit", "score", "report"})
        if unknown:
            raise InputError(f"{where}: unknown section(s) {', '.join(unknown)}")
        if not data.get("run_dir"):
            raise InputError(f"{where}: run_dir is required (--run-dir)")
        return cls(
            run_dir=_abs(data["run_dir"]),  # type: ignore[arg-type]
            model=ModelSection.from_dict(data.get("model"), f"{where}: model"),
            corpus=CorpusSection.from_dict(data.get("corpus"), f"{where}: corpus"),
            fit=FitSection.from_dict(data.get("fit"), f"{where}: fit"),
            score=ScoreSection.from_dict(data["score"], f"{where}: score") if data.get("score") else None,
        )


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"config file {p} must hold a mapping of sections (model, corpus, fit, score)")
    return data


def dump_yaml(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overlay the non-None values of ``overrides`` (nested by section) on ``base``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in overrides.items():
        if isinstance(value, dict):
            section = dict(out.get(key) or {})
            section.update({k: v for k, v in value.items() if v is not None})
            out[key] = section
        elif value is not None:
            out[key] = value
    return out


__all__ = ["ModelSection", "CorpusSection", "FitSection", "ScoreSection", "RunConfig", "read_yaml", "dump_yaml", "merge", "DTYPES"]
