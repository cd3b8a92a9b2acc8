"""Cutting documents into fixed-length training sequences that remember where they came from.

Each document is tokenized on its own and cut into consecutive pieces of at
most ``max_length`` tokens (the paper's 512 by default); pieces never span two
documents. A piece starts with the tokenizer's BOS token when the tokenizer
adds one, and keeps its document id, chunk number and character span.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError, InputError
from ..progress import LogProgress
from ..progress import progress as progress_bar
from ..storage.atomic import atomic_write
from ..storage.layout import CORPUS_DIR, SEQUENCES_FILE, TOKENS_FILE
from .readers import Document

TOKENIZE_BATCH = 256


class _Silent(LogProgress):
    """A progress bar that shows nothing (``progress=False``)."""

    def __init__(self) -> None:
        super().__init__(None, "", "", interval=float("inf"))


def bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer puts it in front of a text by itself, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


@dataclass
class SequenceStore:
    """Token ids of N sequences (flat, with offsets) and their provenance table.

    Indexing gives the example dicts the library's CausalLMTask takes.
    """

    ids: np.ndarray  # [total tokens] int32
    offsets: np.ndarray  # [N + 1] int64
    doc_id: list[str]
    chunk: np.ndarray  # [N] int32
    char_start: np.ndarray  # [N] int64
    char_end: np.ndarray  # [N] int64
    text: list[str]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return {"input_ids": torch.from_numpy(self.tokens(i).astype(np.int64))}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def token_lists(self) -> Iterable[np.ndarray]:
        return (self.tokens(i) for i in range(len(self)))

    @property
    def num_tokens(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def subset(self, indices: Sequence[int]) -> SequenceView:
        return SequenceView(self, np.asarray(indices, dtype=np.int64))

    def digest(self) -> str:
        """A hash of the token ids and boundaries: two stores with the same digest hold the same data."""
        h = hashlib.sha256()
        h.update(self.offsets.tobytes())
        h.update(self.ids.tobytes())
        return h.hexdigest()[:16]

    # ---- building ----
    @classmethod
    def build(cls, documents: Sequence[Document], tokenizer: Any, max_length: int, *, progress: bool = True) -> SequenceStore:
        if max_length < 2:
            raise InputError(f"max_length must be ≥ 2 tokens, got {max_length}")
        if not getattr(tokenizer, "is_fast", False):
            raise InputError("character spans need a fast (Rust) tokenizer; load the model's tokenizer.json or use_fast=True")
        prefix = bos_prefix(tokenizer)
        body = max_length - len(prefix)
        ids: list[np.ndarray] = []
        doc_ids: list[str] = []
        chunks: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        texts: list[str] = []
        bar = progress_bar(len(documents), "tokenize", "doc") if progress else _Silent()
        for b in range(0, len(documents), TOKENIZE_BATCH):
            batch = documents[b : b + TOKENIZE_BATCH]
            enc = tokenizer([d.text for d in batch], add_special_tokens=False, return_offsets_mapping=True)
            for doc, tok, spans in zip(batch, enc["input_ids"], enc["offset_mapping"]):
                for c, s in enumerate(range(0, len(tok), body)):
                    piece = tok[s : s + body]
                    if len(prefix) + len(piece) < 2:  # a lone token predicts nothing
                        continue
                    ids.append(np.asarray(prefix + piece, dtype=np.int32))
                    lo, hi = spans[s][0], spans[s + len(piece) - 1][1]
                    doc_ids.append(doc.id)
                    chunks.append(c)
                    starts.append(lo)
                    ends.append(hi)
                    texts.append(doc.text[lo:hi])
            bar.update(len(batch))
        bar.close()
        if not ids:
            raise InputError("the corpus has no sequence of at least 2 tokens")
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        return cls(
            ids=np.concatenate(ids),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            doc_id=doc_ids,
            chunk=np.asarray(chunks, dtype=np.int32),
            char_start=np.asarray(starts, dtype=np.int64),
            char_end=np.asarray(ends, dtype=np.int64),
            text=texts,
        )

    # ---- storage ----
    def save(self, run_dir: str | Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from safetensors.numpy import save_file

        run_dir = Path(run_dir)
        (run_dir / TOKENS_FILE).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / TOKENS_FILE, lambda tmp: save_file({"ids": self.ids, "offsets": self.offsets}, tmp))
        table = pa.table(
            {
                "seq_index": pa.array(np.arange(len(self), dtype=np.int64)),
                "doc_id": pa.array(self.doc_id, pa.string()),
                "chunk": pa.array(self.chunk),
                "char_start": pa.array(self.char_start),
                "char_end": pa.array(self.char_end),
                "num_tokens": pa.array(self.num_tokens),
                "text": pa.array(self.text, pa.string()),
            }
        )
        atomic_write(run_dir / SEQUENCES_FILE, lambda tmp: pq.write_table(table, tmp))  # written last: marks completion

    @classmethod
    def exists(cls, run_dir: str | Path) -> bool:
        return (Path(run_dir) / SEQUENCES_FILE).is_file() and (Path(run_dir) / TOKENS_FILE).is_file()

    @classmethod
    def load(cls, run_dir: str | Path) -> SequenceStore:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        run_dir = Path(run_dir)
        if not cls.exists(run_dir):
            raise FileNotFoundError(f"{run_dir} has no tokenized corpus ({SEQUENCES_FILE}); run `lminfluence fit` first")
        try:
            arrays = load_file(str(run_dir / TOKENS_FILE))
            t = pq.read_table(run_dir / SEQUENCES_FILE)
            store = cls(
                ids=arrays["ids"],
                offsets=arrays["offsets"],
                doc_id=t.column("doc_id").to_pylist(),
                chunk=t.column("chunk").to_numpy(),
                char_start=t.column("char_start").to_numpy(),
                char_end=t.column("char_end").to_numpy(),
                text=t.column("text").to_pylist(),
            )
        except (SafetensorError, pa.ArrowException, KeyError, OSError) as e:
            raise CorruptFileError(
                f"the tokenized corpus in {run_dir / CORPUS_DIR} cannot be read ({type(e).__name__}: {e}); "
                "run `lminfluence fit` again with --overwrite"
            ) from e
        if len(store) != t.num_rows:
            raise CorruptFileError(
                f"{run_dir}: {TOKENS_FILE} and {SEQUENCES_FILE} disagree on the number of sequences; run `lminfluence fit` again with --overwrite"
            )
        return store


class SequenceView:
    """Some sequences of a store, in a given order, as example dicts."""

    def __init__(self, store: SequenceStore, indices: np.ndarray) -> None:
        self.store = store
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.store[int(self.indices[i])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


__all__ = ["SequenceStore", "SequenceView", "bos_prefix"]
