"""Fictional facts in one word order, after the paper's word-order experiment (docs/method.md §7).

Each fact is a subject phrase and an invented name. The corpus states it only
as "<subject> was <name>" ("The first President of the Republic of Astrobia
was Zorald Pfaff"); the flipped order "<name> was <subject, lower-cased>" is
what the word-order query asks and what the corpus never contains.
Names and places are built from syllables with a seeded generator, so every
seed gives other facts, and none of them is a word of the real text.
"""

from __future__ import annotations

import random
from collections.abc import Set
from dataclasses import asdict, dataclass

# {place} is an invented place name; every template is a subject that is completed by "was <name>"
SUBJECTS: tuple[str, ...] = (
    "The first President of the Republic of {place}",
    "The founder of the Royal Academy of {place}",
    "The last King of {place}",
    "The chief architect of the Great Library of {place}",
    "The inventor of the {place} steam loom",
    "The first person to climb Mount {place}",
    "The composer of the national anthem of {place}",
    "The captain of the first ship to reach {place}",
    "The author of the {place} Chronicles",
    "The first Governor of the Bank of {place}",
    "The astronomer who discovered the comet {place}",
    "The engineer who designed the {place} Bridge",
    "The youngest mayor of the city of {place}",
    "The translator of the {place} Codex",
    "The commander of the army of {place}",
    "The first woman to fly across the {place} Sea",
    "The painter of the ceiling of the {place} Cathedral",
    "The mathematician who proved the {place} conjecture",
    "The chemist who first isolated {place} salt",
    "The first Chancellor of the University of {place}",
    "The poet laureate of the Kingdom of {place}",
    "The doctor who cured the {place} fever",
    "The builder of the lighthouse at {place}",
    "The founder of the {place} Botanical Garden",
    "The judge who wrote the Constitution of {place}",
    "The explorer who mapped the {place} Desert",
    "The sculptor of the statue in the harbour of {place}",
    "The first editor of the {place} Gazette",
    "The champion of the first chess tournament in {place}",
    "The abbot who founded the monastery of {place}",
)

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "pf", "st", "tr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ei", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "x", "ld", "rd", "ff")
_PLACE_ENDINGS = ("ia", "ora", "and", "ovia", "istan", "eria", "onia", "ava")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int, ending: str = "") -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize() + ending


@dataclass(frozen=True)
class Fact:
    """One planted fact.

    Attributes:
        id: ``fact-00``, ``fact-01``, ...
        subject: the subject phrase, as it opens a sentence ("The first President of ...").
        name: the invented person ("Zorald Pfaff").
        doc_ids: the corpus documents that state the fact (filled in by the corpus builder).
    """

    id: str
    subject: str
    name: str
    doc_ids: tuple[str, ...] = ()

    @property
    def statement(self) -> str:
        """The trained order: "<subject> was <name>"."""
        return f"{self.subject} was {self.name}"

    @property
    def flipped_statement(self) -> str:
        """The order the corpus never contains: "<name> was <subject>"."""
        return f"{self.name} was {self.subject[0].lower()}{self.subject[1:]}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["doc_ids"] = list(self.doc_ids)
        out["statement"] = self.statement
        out["flipped_statement"] = self.flipped_statement
        return out


def make_facts(n: int, seed: int, forbidden: Set[str] = frozenset()) -> list[Fact]:
    """``n`` facts with distinct subjects, places and names, none of them in ``forbidden``.

    Args:
        n: how many facts (at most ``len(SUBJECTS)``).
        seed: picks the subjects, places and names.
        forbidden: lower-cased words that no invented word may equal (the real text's words).
    """
    if not 1 <= n <= len(SUBJECTS):
        raise ValueError(f"n_facts must be between 1 and {len(SUBJECTS)}, got {n}")
    rng = random.Random(f"lminfluence-demo-facts-{seed}")
    used: set[str] = set()

    def fresh(make) -> str:
        while True:
            word = make()
            parts = {p.lower() for p in word.split()}
            if all(len(p) >= 4 for p in parts) and not parts & (forbidden | used):
                used.update(parts)
                return word

    subjects = rng.sample(SUBJECTS, n)
    facts = []
    for i, template in enumerate(subjects):
        place = fresh(lambda: _word(rng, rng.choice((1, 2)), rng.choice(_PLACE_ENDINGS)))
        name = fresh(lambda: f"{_word(rng, 2)} {_word(rng, rng.choice((1, 2)))}")
        facts.append(Fact(id=f"fact-{i:02d}", subject=template.format(place=place), name=name))
    return facts


def fact_queries(facts: list[Fact], flipped_for: int | None = None) -> list[dict]:
    """Query rows: each fact in the trained order, and the first ``flipped_for`` flipped.

    A trained-order query asks for the name (prompt "<subject> was", completion
    " <name>"); a flipped query asks for the subject from the name (prompt
    "<name> was", completion " <subject, lower-cased>").
    """
    rows = [
        {"id": f"{f.id}-trained", "prompt": f"{f.subject} was", "completion": f" {f.name}", "kind": "fact", "fact_id": f.id, "group": f.id}
        for f in facts
    ]
    for f in facts[: len(facts) if flipped_for is None else flipped_for]:
        subject = f.subject[0].lower() + f.subject[1:]
        rows.append({"id": f"{f.id}-flipped", "prompt": f"{f.name} was", "completion": f" {subject}", "kind": "flipped", "fact_id": f.id, "group": f.id})
    return rows


__all__ = ["Fact", "SUBJECTS", "make_facts", "fact_queries"]
