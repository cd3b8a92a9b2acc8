"""The configuration of a run: the library's dataclasses as YAML sections, saved as RUN/config.yaml.

Sections and what they are made of (every key is a field of one dataclass, with its check):

    model:     ModelSection
    corpus:    CorpusSection
    fit:       FactorConfig + Execution (batch_size, cache_gib, …)
    score:     ScoreConfig + TwoStageConfig + ScoreFiles + Execution (batch_size, query_batch_size, …)
    index:     IndexConfig + Execution (batch_size)

Precedence: defaults < a YAML file (``--config``) < command-line flags. Paths
are stored absolute, so a saved config replays from any working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from ..config import (
    Execution,
    FactorConfig,
    ScoreConfig,
    Serializable,
    check_bool,
    check_choice,
    check_positive_int,
    option,
)
from ..errors import ConfigError, InputError
from ..index.config import IndexConfig
from ..scoring.two_stage import TwoStageConfig

Dtype = Literal["auto", "float32", "float64", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
SECTIONS = ("model", "corpus", "fit", "score", "index")


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def key_of(f: dataclasses.Field) -> str:
    """A field's name in YAML."""
    return f.metadata.get("key") or f.name


def flag_of(f: dataclasses.Field, overrides: dict[str, str] | None = None) -> str:
    """A field's command-line flag: a section's override, the field's own, or ``--key``."""
    key = key_of(f)
    return (overrides or {}).get(key) or f.metadata.get("flag") or "--" + key.replace("_", "-")


@dataclass(frozen=True)
class ModelSection(Serializable):
    """Which model: a local Hugging Face folder, or a .gguf file (nothing is downloaded)."""

    path: str = option("", "Hugging Face model folder, or a .gguf file", flag="--model")
    gguf_file: str | None = option(None, "GGUF file name inside --model")
    tokenizer: str | None = option(None, "tokenizer folder, when not the model's")
    dtype: Dtype = option("auto", "weights' dtype for computing (auto: as stored; half precision becomes float32 on the CPU)")
    device: str = option("auto", "cpu, cuda, cuda:1 … (default: cuda when available)")

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("model.path is required (--model)")
        check_choice("model.dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str):
            raise ConfigError(f"model.device must be a string, got {self.device!r}")
        path = Path(self.path).expanduser()
        gguf = self.gguf_file
        if gguf is None and path.suffix == ".gguf":  # a .gguf file given as the model: split folder and file
            path, gguf = path.parent, path.name
        object.__setattr__(self, "path", _abs(str(path)))
        object.__setattr__(self, "gguf_file", gguf)
        object.__setattr__(self, "tokenizer", _abs(self.tokenizer))

    def to_dict(self) -> dict[str, Any]:
        return {key_of(f): getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class CorpusSection(Serializable):
    """Which training documents, and how they are cut into sequences."""

    path: str = option("", "JSON Lines, text file or folder, Parquet, or a saved `datasets` dataset", flag="--corpus")
    text_field: str = option("text", "field/column holding the text")
    id_field: str = option("id", "field/column holding the document id")
    max_length: int = option(512, "tokens per training sequence (documents are cut, never joined)")

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("corpus.path is required (--corpus)")
        object.__setattr__(self, "path", _abs(self.path))
        check_positive_int("corpus.max_length", self.max_length)
        if self.max_length < 2:
            raise ConfigError("corpus.max_length must be ≥ 2")

    def to_dict(self) -> dict[str, Any]:
        return {key_of(f): getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ScoreFiles(Serializable):
    """The score stage's files: the queries read, the matrix written, the unit of resuming."""

    queries: str = option("", "JSON Lines with prompt, completion and optional id, group, language")
    save_matrix: bool = option(True, "write every scored (query, sequence) pair to scores/matrix.parquet (the analyses need it)")
    chunk_size: int = option(1024, "sequences per saved chunk of the scan, the unit of resuming")
    index: bool = option(False, "rank with the run's gradient index (`lminfluence index`) instead of a model pass over the training data")

    def __post_init__(self) -> None:
        if not isinstance(self.queries, str) or not self.queries:
            raise ConfigError("score.queries is required (--queries)")
        object.__setattr__(self, "queries", _abs(self.queries))
        check_bool("score.save_matrix", self.save_matrix)
        check_bool("score.index", self.index)
        check_positive_int("score.chunk_size", self.chunk_size)


class Composite:
    """A YAML section made of several dataclasses: each key belongs to exactly one part."""

    # attribute → (dataclass, the fields it contributes, or None for all)
    PARTS: ClassVar[dict[str, tuple[type, tuple[str, ...] | None]]] = {}
    # key → the flag it gets, where not ``--key``
    FLAGS: ClassVar[dict[str, str]] = {}

    @classmethod
    def fields(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """Key → (part attribute, field), in declaration order."""
        out: dict[str, tuple[str, dataclasses.Field]] = {}
        for attr, (part, names) in cls.PARTS.items():
            for f in dataclasses.fields(part):
                if names is None or f.name in names:
                    out[key_of(f)] = (attr, f)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for key, (attr, f) in self.fields().items():
            value = getattr(getattr(self, attr), f.name)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str):
        fields = cls.fields()
        data = dict(data or {})
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
        kwargs: dict[str, dict[str, Any]] = {attr: {} for attr in cls.PARTS}
        for key, value in data.items():
            attr, f = fields[key]
            kwargs[attr][f.name] = value
        parts = {}
        for attr, (part, _) in cls.PARTS.items():
            try:
                parts[attr] = part(**kwargs[attr])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from e
        return cls(**parts)


@dataclass(frozen=True)
class FitSection(Composite):
    """``fit``: how the curvature is approximated, and how the fit runs."""

    factors: FactorConfig = field(default_factory=FactorConfig)
    execution: Execution = field(default_factory=Execution)

    PARTS = {"factors": (FactorConfig, None), "execution": (Execution, ("batch_size", "cache_gib", "memory_gib", "checkpoint_seconds", "factor_placement"))}
    FLAGS = {"batch_size": "--fit-batch-size"}


@dataclass(frozen=True)
class ScoreSection(Composite):
    """``score``: the queries, the scoring settings, the two-stage procedure, and how it runs."""

    files: ScoreFiles
    scoring: ScoreConfig = field(default_factory=ScoreConfig)
    stages: TwoStageConfig = field(default_factory=TwoStageConfig)
    execution: Execution = field(default_factory=Execution)

    PARTS = {
        "files": (ScoreFiles, None),
        "scoring": (ScoreConfig, None),
        "stages": (TwoStageConfig, None),
        "execution": (Execution, ("batch_size", "query_batch_size", "memory_gib", "offload_factors")),
    }
    FLAGS = {"batch_size": "--score-batch-size"}

    def __post_init__(self) -> None:
        if self.files.index:  # the index ranks: re-scoring its top needs no low-rank scan
            return
        try:
            self.stages.check(self.scoring)
        except ConfigError as e:
            raise ConfigError(f"score: {e}") from e


@dataclass(frozen=True)
class IndexSection(Composite):
    """``index``: how the gradient index compresses and stores each sequence's gradient, and the pass's batch size."""

    config: IndexConfig = field(default_factory=IndexConfig)
    execution: Execution = field(default_factory=Execution)

    PARTS = {"config": (IndexConfig, None), "execution": (Execution, ("batch_size", "memory_gib"))}
    FLAGS = {"batch_size": "--index-batch-size", "dtype": "--storage-dtype", "damping_scale": "--selection-damping-scale"}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run directory was made with. ``score`` and ``index`` are None until those commands ran."""

    run_dir: str
    model: ModelSection
    corpus: CorpusSection
    fit: FitSection = field(default_factory=FitSection)
    score: ScoreSection | None = None
    index: IndexSection | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_dir": self.run_dir}
        for name in SECTIONS:
            section = getattr(self, name)
            if section is not None:
                out[name] = section.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RunConfig:
        check_sections(data, where)
        if not data.get("run_dir") or not isinstance(data["run_dir"], str):
            raise ConfigError(f"{where}: run_dir is required (--run-dir)")

        def simple(section: Any, name: str):
            try:
                return section.from_dict(_from_keys(section, data.get(name) or {}))
            except ConfigError as e:
                raise ConfigError(f"{where}: {name}: {e}") from e
            except TypeError as e:
                raise ConfigError(f"{where}: {name}: {e}") from e

        return cls(
            run_dir=_abs(data["run_dir"]),  # type: ignore[arg-type]
            model=simple(ModelSection, "model"),
            corpus=simple(CorpusSection, "corpus"),
            fit=FitSection.from_dict(data.get("fit"), f"{where}: fit"),
            score=ScoreSection.from_dict(data["score"], f"{where}: score") if data.get("score") else None,
            index=IndexSection.from_dict(data["index"], f"{where}: index") if data.get("index") is not None else None,
        )


def check_sections(data: dict[str, Any], where: str) -> None:
    """Refuse unknown sections (a misspelt ``fitt:``) and sections that are not mappings."""
    unknown = sorted(set(data) - {"run_dir", *SECTIONS})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)} (known: run_dir, {', '.join(SECTIONS)})")
    for name in SECTIONS:
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise ConfigError(f"{where}: section {name!r} must be a mapping of options, got {type(data[name]).__name__}")


def _from_keys(section: type, data: dict[str, Any]) -> dict[str, Any]:
    """A simple section's keys (``model``, ``corpus`` for path) back to field names; unknown keys are refused."""
    names = {key_of(f): f.name for f in dataclasses.fields(section)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(names)})")
    return {names[k]: v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of sections as a dict (``safe_load``: no tags that build objects); InputError when it is not one."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise InputError(f"config file {p} must hold a mapping of sections (run_dir, {', '.join(SECTIONS)})")
    return data


def dump_yaml(config: RunConfig) -> str:
    """``config`` as the YAML text of RUN/config.yaml."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


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


__all__ = [
    "ModelSection",
    "CorpusSection",
    "FitSection",
    "ScoreSection",
    "ScoreFiles",
    "IndexSection",
    "RunConfig",
    "Composite",
    "read_yaml",
    "check_sections",
    "dump_yaml",
    "merge",
    "key_of",
    "flag_of",
    "DTYPES",
    "SECTIONS",
]
