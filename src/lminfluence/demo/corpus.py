"""The demo corpus: text that ships with Python, with fictional facts planted in it.

Ordinary documents are the English reference topics of ``pydoc_data`` (one
document per topic; hard-wrapped prose is unwrapped, indented grammar and
code blocks are kept) and a fixed list of standard-library modules (one
document per file). Each planted-fact document is one prose paragraph taken
out of a pydoc topic with the fact's sentence put before, between or after
its sentences (first in a fact's first document), so it reads like the text around it; when its topic is in the
corpus, the paragraph is taken out of it, so no text appears twice.
"""

from __future__ import annotations

import random
import re
import sysconfig
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..corpus.readers import Document
from .facts import Fact

# Modules present (with these names) in every CPython from 3.10 on; read in this order.
STDLIB_MODULES: tuple[str, ...] = (
    "bisect.py", "colorsys.py", "keyword.py", "token.py", "linecache.py", "reprlib.py", "stat.py",
    "fnmatch.py", "sched.py", "abc.py", "glob.py", "copy.py", "graphlib.py", "numbers.py", "operator.py",
    "queue.py", "string.py", "shlex.py", "textwrap.py", "weakref.py", "heapq.py", "contextlib.py",
    "fractions.py", "functools.py", "dataclasses.py", "enum.py",
)

_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"][.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")
_OPEN_KEYWORDS = ("for", "while", "if", "with", "try", "return", "raise", "del")
# 'The "for" statement is used' + ' to iterate over the elements of a sequence': up to 12 words, to the first . , : ; (
_OPEN = re.compile(r'(The "(\w+)" statement (?:is used|specifies|is|may))((?: [^ .,:;(]+){2,12})')




def _paragraphs(raw: str) -> list[str]:
    """A pydoc topic as paragraphs: prose unwrapped to one line, indented blocks verbatim."""
    out = []
    for block in re.split(r"\n\s*\n", raw.strip("\n")):
        lines = [ln for ln in block.split("\n") if not _UNDERLINE.match(ln.strip())]
        if not lines:
            continue
        if any(ln[:1].isspace() for ln in lines):
            out.append("\n".join(ln.rstrip() for ln in lines))
        else:
            out.append(re.sub(r"\s+", " ", " ".join(lines)).strip())
    return out


def pydoc_topics() -> dict[str, list[str]]:
    """Every pydoc topic as a list of paragraphs, keyed by topic name, in sorted order."""
    from pydoc_data.topics import topics

    return {name: _paragraphs(topics[name]) for name in sorted(topics)}


def _sentences(paragraph: str) -> list[str] | None:
    """A prose paragraph's sentences, or None when it is not plain prose of at least 2 sentences."""
    if "\n" in paragraph or paragraph.startswith((" ", "*", "-", "+")) or "::" in paragraph:
        return None
    sentences = _SENTENCE_END.split(paragraph)
    if len(sentences) < 2 or not sentences[-1].endswith("."):
        return None
    if any(len(s) < 20 or len(s) > 300 for s in sentences):
        return None
    return sentences


def stdlib_documents(max_chars: int) -> list[Document]:
    """Standard-library modules from ``STDLIB_MODULES``, in order, while their total fits ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for name in STDLIB_MODULES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8").strip("\n")
        if total + len(text) > max_chars:
            break
        docs.append(Document(id=f"stdlib/{name}", text=text))
        total += len(text)
    return docs


def real_words(topics: dict[str, list[str]], docs: list[Document]) -> set[str]:
    """Lower-cased words of the real text, which invented names must avoid."""
    words = {w.lower() for paras in topics.values() for p in paras for w in _WORD.findall(p)}
    return words | {w.lower() for d in docs for w in _WORD.findall(d.text)}


def build_corpus(
    facts: list[Fact],
    *,
    docs_per_fact: tuple[int, int],
    pydoc_chars: int,
    stdlib_chars: int,
    seed: int,
    max_paragraph_chars: int = 400,
    topics: dict[str, list[str]] | None = None,
) -> tuple[list[Document], list[Fact]]:
    """The corpus documents, and the facts with the ids of the documents that state them.

    Args:
        facts: the facts to plant (their ``doc_ids`` are ignored).
        docs_per_fact: inclusive range of how many documents state each fact.
        pydoc_chars: budget for the pydoc topics: the smallest topics while their total
            fits, then in name order. The paragraphs that carry facts come from any
            topic and are taken out of the corpus topics they belong to.
        stdlib_chars: budget for the standard-library modules.
        seed: picks the paragraphs and the sentence position of each fact.
        max_paragraph_chars: longest paragraph that may carry a fact (so that the
            fact document fits one training sequence with its filler).
        topics: the pydoc topics (default: ``pydoc_topics()``).
    """
    lo, hi = docs_per_fact
    if not 1 <= lo <= hi:
        raise ValueError(f"docs_per_fact must be a range 1 ≤ lo ≤ hi, got {docs_per_fact}")
    rng = random.Random(f"lminfluence-demo-corpus-{seed}")
    topics = topics if topics is not None else pydoc_topics()
    chosen: dict[str, list[str]] = {}
    total = 0
    for name in sorted(topics, key=lambda n: (sum(len(p) for p in topics[n]), n)):  # smallest first
        size = sum(len(p) for p in topics[name])
        if total + size > pydoc_chars:
            break
        alias = next((n for n, paras in chosen.items() if paras == topics[name]), None)
        if alias is not None:  # pydoc has aliases ("else" is "if"): keep the name its title quotes
            if f'"{name}"' in topics[name][0]:
                chosen[name] = chosen.pop(alias)
            continue
        chosen[name] = list(topics[name])
        total += size
    chosen = {name: chosen[name] for name in sorted(chosen)}
    counts = [rng.randint(lo, hi) for _ in facts]
    # any topic's paragraph can carry a fact, whether or not its topic is in the corpus
    slots, seen = [], set()
    for name, paras in topics.items():
        for i, p in enumerate(paras):
            if p not in seen and len(p) <= max_paragraph_chars and _sentences(p) and not _OPEN.match(p):
                slots.append((name, i))
                seen.add(p)
    if len(slots) < sum(counts):
        raise ValueError(f"pydoc has {len(slots)} prose paragraphs, the facts need {sum(counts)}; plant fewer")
    lent = rng.sample(slots, sum(counts))

    planted: list[Document] = []
    with_ids: list[Fact] = []
    k = 0
    for fact, count in zip(facts, counts):
        ids = []
        for j in range(count):
            name, i = lent[k]
            k += 1
            sentences = _sentences(topics[name][i])
            assert sentences is not None  # slots only hold prose paragraphs
            # the first document opens with the fact, so that the model also knows it at the
            # start of a sequence, where a query puts it; the others have it anywhere
            at = 0 if j == 0 else rng.randint(0, len(sentences))
            text = " ".join(sentences[:at] + [fact.statement + "."] + sentences[at:])
            doc_id = f"planted/{fact.id}/{j}"
            planted.append(Document(id=doc_id, text=text))
            ids.append(doc_id)
        with_ids.append(replace(fact, doc_ids=tuple(ids)))

    removed = {topics[name][i] for name, i in lent}  # by text: a paragraph may recur in other topics
    ordinary = [Document(id=f"pydoc/{name}", text="\n\n".join(p for p in paras if p not in removed)) for name, paras in chosen.items()]
    ordinary = [d for d in ordinary if d.text]
    ordinary += stdlib_documents(stdlib_chars)
    return ordinary + planted, with_ids


def fit_planted(docs: list[Document], facts: list[Fact], n_tokens: Callable[[str], int], max_length: int) -> list[Document]:
    """Shorten planted documents to at most ``max_length`` tokens, so each stays one sequence.

    Drops the filler sentence farthest from the fact's sentence until the
    document fits; the fact sentence itself is never cut.
    """
    statements = {d: f.statement + "." for f in facts for d in f.doc_ids}
    out = []
    for doc in docs:
        if doc.id not in statements or n_tokens(doc.text) <= max_length:
            out.append(doc)
            continue
        # split around the fact sentence, not through it: the sentence next to it may end in a way
        # (``**PEP 448**.``) or start in a way (a quote) that the sentence pattern does not split at
        before, statement, after = doc.text.partition(statements[doc.id])
        left = _SENTENCE_END.split(before.strip()) if before.strip() else []
        right = _SENTENCE_END.split(after.strip()) if after.strip() else []
        sentences, at = left + [statement] + right, len(left)
        while n_tokens(" ".join(sentences)) > max_length:
            if len(sentences) == 1:
                raise ValueError(f"the fact sentence of {doc.id} alone is longer than max_length={max_length} tokens")
            if len(sentences) - 1 - at >= at:
                sentences.pop()
            else:
                sentences.pop(0)
                at -= 1
        out.append(Document(id=doc.id, text=" ".join(sentences)))
    return out


def open_queries(docs: list[Document]) -> list[dict]:
    """Open-ended queries on the pydoc text: 'The "for" statement is used' → ' to iterate over ...'.

    One per statement keyword of ``_OPEN_KEYWORDS`` whose sentence is in a pydoc
    document of the corpus; the completion is the rest of the sentence's first
    clause (at most 12 words). Paragraphs holding these sentences are never lent to facts.
    """
    found: dict[str, dict] = {}
    for doc in docs:
        if not doc.id.startswith("pydoc/"):
            continue
        for p in doc.text.split("\n\n"):
            m = _OPEN.match(p)
            if m and m.group(2) in _OPEN_KEYWORDS and m.group(2) not in found:
                found[m.group(2)] = {"id": f"open-{m.group(2)}", "prompt": m.group(1), "completion": m.group(3), "kind": "open", "fact_id": None}
    return [found[k] for k in _OPEN_KEYWORDS if k in found]

__all__ = ["Document", "STDLIB_MODULES", "pydoc_topics", "stdlib_documents", "real_words", "build_corpus", "fit_planted", "open_queries"]
