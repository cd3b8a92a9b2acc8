"""The study's two corpora as ``lminfluence`` documents, built from the Debian packages of ``corpora.py``.

- ``mixed_documents`` (SmolLM2): Jane Austen's chapters, the King James
  Bible's chapters, Python's documentation topics and standard-library
  modules, in equal shares of training sequences.
- ``multilingual_documents`` (Gemma): the Bible in English (KJV) and Spanish
  (Reina-Valera 1909) in windows of a few consecutive verses, the same windows
  in both languages; and LibreOffice help pages in five languages, the same
  pages in each. A document id is ``<source>/<key>`` where the key is shared by
  the translations of one text (``kjv/Gen.1.1-4`` and ``rv1909/Gen.1.1-4``,
  ``help-de/text/…/table_insert.html`` and ``help-ko/…``).

Each document is cut to at most ``per_doc`` training sequences of ``length``
tokens (the model's tokenizer counts), so a few long documents cannot fill the
corpus. A source that cannot be fetched is left out with a warning; the study
says which sources it used.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import corpora
from lminfluence.corpus.readers import Document
from lminfluence.corpus.sequences import bos_prefix

from .queries import BIBLE_REFS, HELP_LANGUAGES, HELP_PARAGRAPHS

logger = logging.getLogger(__name__)

MIXED_SOURCES = ("austen", "kjv", "pydoc", "code")


def cut_to_tokens(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, int]:
    """(the text up to its first ``max_tokens`` tokens, how many tokens that is)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if n <= max_tokens:
        return text, n
    return text[: enc["offset_mapping"][max_tokens - 1][1]], max_tokens


def take_sequences(tokenizer: Any, docs: Iterable[tuple[str, str]], quota: int, length: int, per_doc: int) -> list[Document]:
    """Documents (id, text), each cut to ``per_doc`` sequences, until they make ``quota`` sequences of ``length`` tokens."""
    body = length - len(bos_prefix(tokenizer))
    out, count = [], 0
    for doc_id, text in docs:
        if count >= quota:
            break
        cut, n = cut_to_tokens(tokenizer, text, min(per_doc, quota - count) * body)
        if n < 2:
            continue
        out.append(Document(doc_id, cut))
        count += -(-n // body)
    return out


def mixed_documents(tokenizer: Any, cache: Path, per_source: int, length: int, per_doc: int = 3, seed: int = 0) -> tuple[list[Document], list[str]]:
    """(documents, the sources used): ``per_source`` sequences from each of Austen, KJV, pydoc topics and stdlib code."""
    docs, used = [], []
    for source in MIXED_SOURCES:
        found = [d for d in corpora.load_documents(cache, (source,)) if d.source == source]  # not the pydoc fallback
        if not found:
            logger.warning("%s: not available, left out of the corpus", source)
            continue
        random.Random(f"{seed}/{source}").shuffle(found)
        docs += take_sequences(tokenizer, ((f"{source}/{d.id}", d.text) for d in found), per_source, length, per_doc)
        used.append(source)
    return docs, used


def verse_windows(verses: Sequence[tuple[str, str, str]], width: int) -> list[list[tuple[str, str, str]]]:
    """Consecutive verses in windows of ``width``, never across a chapter (the last window of a chapter may be shorter)."""
    windows: list[list[tuple[str, str, str]]] = []
    for v in verses:
        chapter = v[0].rsplit(".", 1)[0]
        if windows and len(windows[-1]) < width and windows[-1][0][0].rsplit(".", 1)[0] == chapter:
            windows[-1].append(v)
        else:
            windows.append([v])
    return windows


def window_key(window: Sequence[tuple[str, str, str]]) -> str:
    return f"{window[0][0]}-{window[-1][0].rsplit('.', 1)[1]}"


def bible_documents(verses: Sequence[tuple[str, str, str]], windows: int, width: int, seed: int, forced: Sequence[str] = BIBLE_REFS) -> list[Document]:
    """``windows`` verse windows (plus those holding the ``forced`` verses), each in English and in Spanish."""
    all_windows = verse_windows(verses, width)
    rng = random.Random(f"{seed}/bible")
    picked = set(rng.sample(range(len(all_windows)), min(windows, len(all_windows))))
    picked |= {i for i, w in enumerate(all_windows) if any(v[0] in forced for v in w)}
    docs = []
    for i in sorted(picked):
        w, key = all_windows[i], window_key(all_windows[i])
        docs.append(Document(f"kjv/{key}", " ".join(v[1] for v in w)))
        docs.append(Document(f"rv1909/{key}", " ".join(v[2] for v in w)))
    return docs


def help_documents(tokenizer: Any, pages: dict[str, dict], count: int, length: int, per_doc: int, seed: int) -> list[Document]:
    """``count`` help pages (plus the queries' pages) in every language of ``pages`` (language → path → (text, paragraphs))."""
    common = sorted(set.intersection(*(set(p) for p in pages.values())))
    rng = random.Random(f"{seed}/help")
    picked = set(rng.sample(common, min(count, len(common)))) | {page for page, _ in HELP_PARAGRAPHS if page in common}
    body = length - len(bos_prefix(tokenizer))
    docs = []
    for page in sorted(picked):
        for language, by_path in pages.items():
            text, _ = by_path[page]
            cut, n = cut_to_tokens(tokenizer, text, per_doc * body)
            if n >= 2:
                docs.append(Document(f"help-{language}/{page}", cut))
    return docs


def multilingual_documents(
    tokenizer: Any, cache: Path, windows: int, pages: int, length: int, per_doc: int = 2, width: int = 4, seed: int = 0
) -> tuple[list[Document], dict[str, Any]]:
    """(documents, what the queries need: ``verses`` ref → (en, es) and ``paragraphs`` language → {(page, id): text}).

    Raises:
        RuntimeError: neither the Bibles nor any help package could be fetched.
    """
    docs: list[Document] = []
    verses = corpora.aligned_verses(cache)
    extra: dict[str, Any] = {"verses": {}, "paragraphs": {}, "sources": []}
    if verses is None:
        logger.warning("sword-text-kjv or sword-text-sparv: not available, no Bible in the corpus")
    else:
        docs += bible_documents(verses, windows, width, seed)
        extra["verses"] = {ref: (en, es) for ref, en, es in verses if ref in BIBLE_REFS}
        extra["sources"] += ["sword-text-kjv", "sword-text-sparv"]
    by_language = {}
    for language in HELP_LANGUAGES:
        found = corpora.libreoffice_pages(language, cache)
        if found is None:
            logger.warning("libreoffice-help-%s: not available, left out", language)
            continue
        by_language[language] = found
        extra["paragraphs"][language] = {(page, pid): text for page, _ in HELP_PARAGRAPHS for pid, text in found.get(page, ("", {}))[1].items()}
        extra["sources"].append(f"libreoffice-help-{language}")
    if by_language:
        docs += help_documents(tokenizer, by_language, pages, length, per_doc, seed)
    if not docs:
        raise RuntimeError("no multilingual corpus: none of sword-text-kjv/-sparv or libreoffice-help-* could be fetched (apt-get download)")
    return docs, extra


__all__ = ["mixed_documents", "multilingual_documents", "take_sequences", "cut_to_tokens", "verse_windows", "window_key", "bible_documents", "MIXED_SOURCES"]
