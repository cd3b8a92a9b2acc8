"""Reading documents and queries from the formats researchers keep them in.

Corpus: JSON Lines (a ``text`` field, optional ``id``), plain-text files or a
folder of them (one document per file), Parquet, or a ``datasets`` dataset
saved with ``save_to_disk``. Queries: JSON Lines with ``prompt``,
``completion`` and optional ``id``, ``group`` and ``language``. Every error names the file and, where
there is one, the line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Document:
    """A training document: its id and text (cut into sequences by ``SequenceStore.build``)."""

    id: str
    text: str


@dataclass(frozen=True)
class Query:
    """A prompt and the completion whose log-probability is measured.

    ``group`` ties queries that ask the same thing (a fact in two word orders,
    one question in several languages); ``language`` names the query's
    language within its group. Both are optional labels used by the analyses.
    """

    id: str
    prompt: str
    completion: str
    group: str | None = None
    language: str | None = None


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if p.is_file():
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            raise InputError(f"{what} {p} cannot be read: {e.strerror or e}") from e
    return p


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e}") from e


def _field(row: dict, name: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise InputError(f"{where}: missing the {name!r} field (present: {', '.join(map(repr, row)) or 'none'})")
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


def _from_jsonl(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    for lineno, row in _jsonl_rows(path):
        where = f"{path}:{lineno}"
        text = _field(row, text_field, where)
        doc_id = _field(row, id_field, where, required=False) or f"{path.name}:{lineno}"
        yield Document(doc_id, text)  # type: ignore[arg-type]


def _from_table(table, source: str, text_field: str, id_field: str) -> Iterator[Document]:
    columns = list(table.column_names)
    if text_field not in columns:
        raise InputError(f"{source}: no column {text_field!r} (columns: {', '.join(columns)}); set --text-field")
    texts = table.column(text_field).to_pylist()
    ids = table.column(id_field).to_pylist() if id_field in columns else [None] * len(texts)
    for i, (text, doc_id) in enumerate(zip(texts, ids)):
        if text is not None and not isinstance(text, str):
            raise InputError(f"{source}: row {i}: column {text_field!r} must hold strings, got {type(text).__name__}")
        yield Document(str(doc_id) if doc_id is not None else f"{Path(source).name}:{i}", text or "")


def _from_parquet(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise InputError(f"{path} is not a readable Parquet file: {e}") from e
    yield from _from_table(table, str(path), text_field, id_field)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _from_saved_dataset(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as e:
        raise InputError(f"{path} is a saved `datasets` dataset; install the `datasets` package to read it") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"{path} holds splits {', '.join(ds)}; point at one split's folder or add a 'train' split")
        ds = ds["train"]
    yield from _from_table(ds.data.table if hasattr(ds.data, "table") else ds.data, str(path), text_field, id_field)


def _from_text_file(path: Path, root: Path) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise InputError(f"{path} cannot be read: {e.strerror or e}") from e
    return Document(str(path.relative_to(root)) if path != root else path.name, text)


def iter_documents(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Yield the documents of a corpus file or folder, in a deterministic order."""
    p = _existing(path, "corpus")
    if p.is_dir():
        if _is_saved_dataset(p):
            yield from _from_saved_dataset(p, text_field, id_field)
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise InputError(f"corpus folder {p} has no files")
        for f in files:
            suffix = f.suffix.lower()
            if suffix in JSONL_SUFFIXES:
                yield from _from_jsonl(f, text_field, id_field)
            elif suffix in PARQUET_SUFFIXES:
                yield from _from_parquet(f, text_field, id_field)
            elif suffix in TEXT_SUFFIXES:
                yield _from_text_file(f, p)
            else:
                logger.warning("skipping %s: not .txt/.md/.rst, .jsonl or .parquet", f)
        return
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _from_jsonl(p, text_field, id_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from _from_parquet(p, text_field, id_field)
    else:
        yield _from_text_file(p, p)


def read_documents(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> list[Document]:
    """All non-empty documents of a corpus; an error if there are none or ids repeat."""
    docs = [d for d in iter_documents(path, text_field=text_field, id_field=id_field) if d.text.strip()]
    if not docs:
        raise InputError(f"corpus {path} has no non-empty documents")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise InputError(f"corpus {path}: document id {d.id!r} appears twice; ids must be unique")
        seen.add(d.id)
    return docs


def read_queries(path: str | Path) -> list[Query]:
    """Queries from JSON Lines with ``prompt``, ``completion`` and optional ``id``, ``group``, ``language``."""
    p = _existing(path, "queries file")
    if p.is_dir():
        raise InputError(f"queries must be a JSON Lines file, {p} is a folder")
    out: list[Query] = []
    for lineno, row in _jsonl_rows(p):
        where = f"{p}:{lineno}"
        prompt = _field(row, "prompt", where)
        completion = _field(row, "completion", where)
        if not completion:
            raise InputError(f"{where}: the completion is empty; influence is measured on the completion's tokens")
        out.append(
            Query(
                _field(row, "id", where, required=False) or str(lineno),
                prompt or "",
                completion,
                group=_field(row, "group", where, required=False),
                language=_field(row, "language", where, required=False),
            )
        )
    if not out:
        raise InputError(f"queries file {p} has no queries")
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{p}: query id {dup!r} appears twice; ids must be unique")
    return out


__all__ = ["Document", "Query", "iter_documents", "read_documents", "read_queries"]
