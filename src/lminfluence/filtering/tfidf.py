"""TF-IDF candidate filtering over the model's token ids (docs/method.md §6, paper Eqs 28–29).

With binary term occurrence x_t ∈ {0, 1} the paper's BM25-style score of a
document D for a query Q is

    score(Q, D) = Σ_{t ∈ Q, distinct} (k1 + 1)·x_t / (k1 + x_t) · IDF(t) = Σ_{t ∈ Q ∩ D} IDF(t)
    IDF(t) = log((C - n_t + 0.5) / (n_t + 0.5) + 1)

(C documents, n_t of them contain t). Ranking is one sparse product of the
queries' IDF-weighted indicator rows [Q, V] with the inverted index [V, C].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

K1 = 1.5


def _indicator(token_lists: Iterable[Sequence[int] | np.ndarray], vocab_size: int | None) -> sp.csr_matrix:
    """Binary [rows, V] occurrence matrix (duplicates within a row count once)."""
    indptr, indices = [0], []
    for i, tokens in enumerate(token_lists):
        ids = np.unique(np.asarray(tokens, dtype=np.int64))
        if ids.size and ids[0] < 0:
            raise InputError(f"row {i}: negative token id {int(ids[0])}")
        indices.append(ids)
        indptr.append(indptr[-1] + ids.size)
    cols = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    width = int(cols.max()) + 1 if cols.size else 0
    if vocab_size is not None:
        if width > vocab_size:
            raise InputError(f"token id {width - 1} is outside the vocabulary of {vocab_size}")
        width = vocab_size
    data = np.ones(cols.size, dtype=np.float32)
    return sp.csr_matrix((data, cols, np.asarray(indptr)), shape=(len(indptr) - 1, width))


class TfidfIndex:
    """An inverted index of documents' token ids with the paper's IDF weights.

    Build it once per corpus (``build``), save it next to the run (``save``),
    then rank candidates for any number of queries (``top_k``).
    """

    def __init__(self, inverted: sp.csr_matrix, doc_freq: np.ndarray, num_docs: int, k1: float = K1) -> None:
        self.inverted = inverted.tocsr()  # [V, C], binary
        self.doc_freq = doc_freq  # [V], n_t
        self.num_docs = num_docs
        self.k1 = k1
        c, n = float(num_docs), doc_freq.astype(np.float64)
        self.idf = np.log((c - n + 0.5) / (n + 0.5) + 1.0).astype(np.float32)  # Eq 29

    @classmethod
    def build(cls, documents: Iterable[Sequence[int] | np.ndarray], vocab_size: int | None = None, k1: float = K1) -> TfidfIndex:
        """Index documents given as token-id sequences."""
        docs = _indicator(documents, vocab_size)  # [C, V]
        if docs.shape[0] == 0:
            raise InputError("cannot build a TF-IDF index of an empty corpus")
        doc_freq = np.asarray(docs.sum(axis=0)).ravel().astype(np.int64)
        return cls(docs.T.tocsr(), doc_freq, docs.shape[0], k1)

    def scores(self, queries: Iterable[Sequence[int]]) -> np.ndarray:
        """score(Q, D) for every query and document, [Q, C] float32."""
        q = _indicator(queries, None)  # [Q, V']
        vocab = self.inverted.shape[0]
        if q.shape[1] > vocab:  # tokens the corpus never saw match no document
            q = q[:, :vocab]
        weights = q.multiply(self.idf[: q.shape[1]]).tocsr()  # [Q, V'], IDF of each distinct query token
        # x_t = 1 for every matched token, so (k1+1)x/(k1+x) = 1 and the score is the IDF sum
        inverted = self.inverted[: weights.shape[1]]
        return np.asarray((weights @ inverted).todense(), dtype=np.float32)

    def top_k(self, queries: Iterable[Sequence[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best documents of each query: (scores [Q, k], indices [Q, k]), best first.

        Ties are broken by the lower document index, so the result is deterministic.
        """
        if k < 1:
            raise InputError(f"k must be ≥ 1, got {k}")
        s = self.scores(queries)
        k = min(k, s.shape[1])
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(s.shape[1]), (s.shape[0], 1))
        # order the k by score, then by index (lexsort's last key is the primary one)
        rows = np.arange(s.shape[0])[:, None]
        vals = s[rows, part]
        order = np.lexsort((part, -vals), axis=1)
        idx = part[rows, order]
        return s[rows, idx], idx

    def save(self, path: str | Path | BinaryIO) -> None:
        """Write the index to one .npz file."""
        inv = self.inverted
        np.savez_compressed(
            path,
            indptr=inv.indptr,
            indices=inv.indices,
            shape=np.asarray(inv.shape),
            doc_freq=self.doc_freq,
            num_docs=np.asarray(self.num_docs),
            k1=np.asarray(self.k1),
        )

    @classmethod
    def load(cls, path: str | Path) -> TfidfIndex:
        with np.load(path) as z:
            inv = sp.csr_matrix(
                (np.ones(z["indices"].size, dtype=np.float32), z["indices"], z["indptr"]), shape=tuple(z["shape"])
            )
            return cls(inv, z["doc_freq"], int(z["num_docs"]), float(z["k1"]))


__all__ = ["TfidfIndex", "K1"]
