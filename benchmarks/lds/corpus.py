"""The LDS benchmark's data: the demo's corpus at a smaller size, and its queries.

Training text: what ``lminfluence demo`` trains on, built with the demo's own
builders (``lminfluence.demo.corpus``, ``facts``, ``model``): the smallest
pydoc reference topics, a few standard-library modules, and fictional facts
("The first President of the Republic of Astrobia was Zorald Pfaff"), each
stated in a few documents. A byte-level BPE is trained on it and the documents
are cut into sequences of at most ``max_length`` tokens by ``SequenceStore.build``
(what ``lminfluence fit`` does): those sequences are the training set whose
random halves are retrained.

Queries, two groups:

- ``fact``: each planted fact in its trained order (the demo's queries,
  prompt "<subject> was", completion " <name>"). Training text: whether a
  subset holds the fact's documents decides f, so these test whether a method
  finds the few sequences that matter.
- ``heldout``: windows of pydoc prose paragraphs that are *not* in the corpus
  (topics beyond the corpus budget): the first ``prompt_words`` words are
  the prompt, the next ``completion_words`` the completion. Held-out text:
  f is generalisation from many sequences at once, the usual LDS setting.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lminfluence.corpus import SequenceStore
from lminfluence.demo import corpus as demo_corpus
from lminfluence.demo.facts import fact_queries, make_facts
from lminfluence.demo.model import train_tokenizer
from lminfluence.task.causal_lm import examples_from_pairs

_PROSE = re.compile(r"^[A-Z][^\n]*[.]$")  # one unwrapped prose line: a capital first, a full stop last


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes of the benchmark's corpus and queries.

    Attributes:
        n_facts: planted facts (one ``fact`` query each).
        docs_per_fact: inclusive range of the documents stating each fact.
        pydoc_chars, stdlib_chars: character budgets of the real text.
        vocab_size: BPE vocabulary, EOS included.
        max_length: tokens per training sequence.
        n_heldout: ``heldout`` queries.
        prompt_words, completion_words: the held-out windows' split, in words.
        seed: picks the facts, their paragraphs and the held-out paragraphs.
    """

    n_facts: int = 24
    docs_per_fact: tuple[int, int] = (2, 4)
    pydoc_chars: int = 36_000
    stdlib_chars: int = 6_000
    vocab_size: int = 512
    max_length: int = 64
    n_heldout: int = 32
    prompt_words: int = 16
    completion_words: int = 6
    seed: int = 0


@dataclass
class Corpus:
    """Training sequences, queries and the tokenizer, as the benchmark uses them.

    Attributes:
        store: the N training sequences (``store[i]`` is an example dict).
        queries: Q rows ``{"id", "group", "prompt", "completion"}``.
        examples: the Q query examples (prompt labels -100).
        tokenizer: the BPE the sequences and queries were cut with.
        facts: the planted facts with the ids of the documents stating them.
        max_length: tokens per training sequence (queries fit it too).
    """

    store: SequenceStore
    queries: list[dict[str, Any]]
    examples: list[dict[str, list[int]]]
    tokenizer: Any
    facts: list[dict[str, Any]]
    max_length: int

    @property
    def train(self) -> list[dict]:
        return [self.store[i] for i in range(len(self.store))]

    def groups(self) -> np.ndarray:
        """[Q] each query's group name."""
        return np.array([q["group"] for q in self.queries])


def heldout_windows(topics: dict[str, list[str]], corpus_text: str, n_tokens: Callable[[str], int], spec: CorpusSpec) -> list[dict]:
    """``spec.n_heldout`` prompt/completion windows from prose paragraphs absent from the corpus.

    Paragraphs: one-line prose (a capital first, a full stop last) of at least
    ``prompt_words + completion_words`` words, not found in the training text.
    Picked by a seeded shuffle, one per topic before any topic gives a second,
    so that the queries spread over many subjects; each query is the paragraph's first words,
    kept when it fits one sequence (``n_tokens(prompt + completion) ≤ max_length``).
    """
    need = spec.prompt_words + spec.completion_words
    candidates = [(name, p) for name, paras in topics.items() for p in paras
                  if _PROSE.match(p) and len(p.split()) >= need and p not in corpus_text]
    shuffled = [candidates[k] for k in np.random.default_rng([spec.seed, 7]).permutation(len(candidates))]
    nth, seen = [], {}  # nth[k]: how many paragraphs of the same topic come before shuffled[k]
    for name, _ in shuffled:
        nth.append(seen.get(name, 0))
        seen[name] = nth[-1] + 1
    rows = []
    for _, (name, p) in sorted(zip(nth, shuffled), key=lambda x: x[0]):  # first paragraphs of every topic, then seconds, ...
        words = p.split()
        prompt = " ".join(words[: spec.prompt_words])
        completion = " " + " ".join(words[spec.prompt_words : need])
        if n_tokens(prompt + completion) <= spec.max_length:
            rows.append({"id": f"heldout-{len(rows):02d}", "group": "heldout", "prompt": prompt, "completion": completion, "topic": name})
        if len(rows) == spec.n_heldout:
            break
    if len(rows) < spec.n_heldout:
        raise ValueError(f"only {len(rows)} held-out paragraphs of ≥ {need} words; ask for fewer or shorter queries")
    return rows


def build_corpus(spec: CorpusSpec, cache: Path | None = None) -> Corpus:
    """The corpus, tokenizer and queries of ``spec``; cached in ``cache`` (built once, then read)."""
    from transformers import PreTrainedTokenizerFast

    if cache is not None and (cache / "corpus.json").is_file():
        saved = json.loads((cache / "corpus.json").read_text())
        if saved["spec"] == json.loads(json.dumps(asdict(spec))):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(cache / "tokenizer")
            store = SequenceStore.load(cache)
            return Corpus(store, saved["queries"], _examples(tokenizer, saved["queries"]), tokenizer, saved["facts"], spec.max_length)
    topics = demo_corpus.pydoc_topics()
    forbidden = demo_corpus.real_words(topics, demo_corpus.stdlib_documents(spec.stdlib_chars))
    facts = make_facts(spec.n_facts, spec.seed, forbidden)
    docs, facts = demo_corpus.build_corpus(
        facts, docs_per_fact=spec.docs_per_fact, pydoc_chars=spec.pydoc_chars, stdlib_chars=spec.stdlib_chars,
        seed=spec.seed, topics=topics,
    )  # fit_planted then trims each fact document's filler sentences to one sequence
    tokenizer = train_tokenizer((d.text for d in docs), spec.vocab_size)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    docs = demo_corpus.fit_planted(docs, facts, n_tokens, spec.max_length)
    store = SequenceStore.build(docs, tokenizer, spec.max_length, progress=False)
    queries = [{k: q[k] for k in ("id", "prompt", "completion")} | {"group": "fact"} for q in fact_queries(facts, flipped_for=0)]
    queries += heldout_windows(topics, "\n".join(d.text for d in docs), n_tokens, spec)
    fact_rows = [f.to_dict() for f in facts]
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(cache / "tokenizer")
        store.save(cache)
        (cache / "corpus.json").write_text(json.dumps({"spec": asdict(spec), "queries": queries, "facts": fact_rows}, indent=1))
    return Corpus(store, queries, _examples(tokenizer, queries), tokenizer, fact_rows, spec.max_length)


def _examples(tokenizer: Any, queries: list[dict]) -> list[dict[str, list[int]]]:
    return examples_from_pairs(tokenizer, [(q["prompt"], q["completion"]) for q in queries], add_special_tokens=False)


__all__ = ["CorpusSpec", "Corpus", "build_corpus", "heldout_windows"]
