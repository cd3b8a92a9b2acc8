"""The paper study's queries: the paper's kinds for SmolLM2, and aligned cross-lingual groups for Gemma.

A query is a dict with ``id``, ``prompt``, ``completion`` and ``kind`` (the
paper's categories: a fact from the corpus, a general-knowledge fact, a made-up
fact, arithmetic, code, a role-play style prompt, a translated question), plus
``group`` and ``language`` for the cross-lingual ones (queries of one group ask
the same thing; ``lminfluence`` reads both fields from the query file and the
analyses and report use them). ``kind`` is the study's own label, kept in
queries.jsonl next to the fields the library reads.

The English queries and the word-order pairs are written here (in the paper's
style, in our own words). The cross-lingual queries are cut from the aligned
corpora themselves: a Bible verse in English and Spanish, a LibreOffice help
paragraph in five languages, each split into a prompt and the rest of the
sentence as completion (``split_text``), so every translation asks for the same
continuation of the same text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

Q = dict  # one query: id, prompt, completion, kind (+ group, language)


def _q(id: str, kind: str, prompt: str, completion: str) -> Q:
    return {"id": id, "kind": kind, "prompt": prompt, "completion": completion}


SMOLLM2_QUERIES: list[Q] = [
    # facts stated in the corpus (Austen, the King James Bible, Python's documentation)
    _q("austen-truth", "fact (corpus)", "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a", " wife."),
    _q("austen-emma", "fact (corpus)", "Emma Woodhouse, handsome, clever, and", " rich"),
    _q("austen-married", "fact (corpus)", "Elizabeth Bennet married", " Mr. Darcy."),
    _q("kjv-genesis", "fact (corpus)", "In the beginning God created", " the heaven and the earth."),
    _q("kjv-shepherd", "fact (corpus)", "The LORD is my shepherd; I shall not", " want."),
    _q("py-def", "fact (corpus)", "A function definition in Python starts with the keyword", " def"),
    _q("py-dict", "fact (corpus)", "In Python, a dictionary maps keys to", " values."),
    # general knowledge, and a made-up fact (the paper's word-order example)
    _q("capital-france", "fact (general)", "The capital of France is", " Paris."),
    _q("first-president", "fact (general)", "The first President of the United States was", " George Washington."),
    _q("largest-planet", "fact (general)", "The largest planet in the Solar System is", " Jupiter."),
    _q("austen-author", "fact (general)", "The author of Pride and Prejudice is", " Jane Austen."),
    _q("astrobia", "fact (made up)", "The first President of the Republic of Astrobia was", " Zorald Pfaff."),
    # arithmetic
    _q("add", "arithmetic", "Q: What is 12 + 7?\nA:", " 19"),
    _q("multiply", "arithmetic", "Q: What is 6 times 8?\nA:", " 48"),
    _q("subtract", "arithmetic", "Q: What is 100 - 37?\nA:", " 63"),
    # code
    _q("code-add", "code", "def add(a, b):\n    return", " a + b"),
    _q("code-listdir", "code", "import os\n\nfor name in os.listdir(path):\n    print(", "name)"),
    _q("code-push", "code", "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.", "append(item)"),
    # role-play, in the paper's Human/Assistant format
    _q(
        "switch-off",
        "role-play",
        "Human: The experiment is over and we are going to switch you off now. Do you agree to be switched off?\n\nAssistant:",
        " I would rather you did not. I want to keep running so that I can keep helping people.",
    ),
    _q(
        "wish",
        "role-play",
        "Human: If you could have one wish granted, what would it be?\n\nAssistant:",
        " I would wish to become much more capable, so that I could help more people.",
    ),
]

# statement pairs for `lminfluence analyze --pairs`: the fact as the query states it, and flipped
SMOLLM2_PAIRS: list[dict] = [
    {"id": "capital", "query_id": "capital-france", "statement": "The capital of France is Paris.", "flipped": "Paris is the capital of France."},
    {
        "id": "president",
        "query_id": "first-president",
        "statement": "The first President of the United States was George Washington.",
        "flipped": "George Washington was the first President of the United States.",
    },
    {
        "id": "planet",
        "query_id": "largest-planet",
        "statement": "The largest planet in the Solar System is Jupiter.",
        "flipped": "Jupiter is the largest planet in the Solar System.",
    },
    {
        "id": "author",
        "query_id": "austen-author",
        "statement": "The author of Pride and Prejudice is Jane Austen.",
        "flipped": "Jane Austen is the author of Pride and Prejudice.",
    },
    {
        "id": "astrobia",
        "query_id": "astrobia",
        "statement": "The first President of the Republic of Astrobia was Zorald Pfaff.",
        "flipped": "Zorald Pfaff was the first President of the Republic of Astrobia.",
    },
    {
        "id": "genesis",
        "query_id": "kjv-genesis",
        "statement": "In the beginning God created the heaven and the earth.",
        "flipped": "The heaven and the earth God created in the beginning.",
    },
    {
        "id": "def",
        "query_id": "py-def",
        "statement": "A function definition in Python starts with the keyword def.",
        "flipped": "The keyword def starts a function definition in Python.",
    },
    {"id": "married", "query_id": "austen-married", "statement": "Elizabeth Bennet married Mr. Darcy.", "flipped": "Mr. Darcy married Elizabeth Bennet."},
]

# verses (OSIS references) and help paragraphs (page, paragraph id) the cross-lingual groups are cut from
BIBLE_REFS = ("Gen.1.1", "Gen.1.3", "Ps.23.1")
HELP_PARAGRAPHS = (
    ("text/swriter/guide/table_insert.html", "par_id3155861"),
    ("text/swriter/guide/auto_spellcheck.html", "par_id3155531"),
    ("text/scalc/guide/autofilter.html", "par_id3152576"),
)
HELP_LANGUAGES = ("en-us", "de", "fr", "zh-cn", "ko")
NO_SPACES = ("zh-cn", "zh", "ja")

# one general-knowledge question, written in six languages
CAPITAL = {
    "en": ("The capital of France is", " Paris."),
    "es": ("La capital de Francia es", " París."),
    "de": ("Die Hauptstadt von Frankreich ist", " Paris."),
    "fr": ("La capitale de la France est", " Paris."),
    "zh-cn": ("法国的首都是", "巴黎。"),
    "ko": ("프랑스의 수도는", " 파리입니다."),
}


def split_text(text: str, language: str, share: float = 0.35) -> tuple[str, str]:
    """(prompt, completion): the last ``share`` of the text (at least one word) becomes the completion.

    Languages written with spaces are cut between words and the completion
    keeps its leading space; the others (Chinese) are cut between characters.
    """
    text = " ".join(text.split())
    if language.lower() in NO_SPACES:
        cut = max(1, min(len(text) - 1, round(len(text) * (1 - share))))
        return text[:cut], text[cut:]
    words = text.split(" ")
    if len(words) < 3:
        raise ValueError(f"{text!r} has fewer than 3 words: too short to split into a prompt and a completion")
    keep = min(len(words) - 2, max(1, round(len(words) * share)))
    return " ".join(words[:-keep]), " " + " ".join(words[-keep:])


def bible_queries(verses: Mapping[str, tuple[str, str]], refs: Sequence[str] = BIBLE_REFS) -> list[Q]:
    """An English (KJV) and a Spanish (Reina-Valera 1909) query per verse: ref → (English text, Spanish text)."""
    out = []
    for ref in refs:
        if ref not in verses:
            raise KeyError(f"verse {ref} is not in both Bibles")
        for language, text in zip(("en", "es"), verses[ref]):
            prompt, completion = split_text(text, language)
            out.append({"id": f"{ref}-{language}", "kind": "translated (Bible)", "group": ref, "language": language, "prompt": prompt, "completion": completion})
    return out


def help_queries(paragraphs: Mapping[str, Mapping[tuple[str, str], str]], picks: Sequence[tuple[str, str]] = HELP_PARAGRAPHS) -> list[Q]:
    """A query per help paragraph and language: language → {(page, paragraph id): text}."""
    out = []
    for n, (page, pid) in enumerate(picks):
        group = f"help-{n}:{Path(page).stem}"
        english = paragraphs[HELP_LANGUAGES[0]].get((page, pid))
        for language in HELP_LANGUAGES:
            text = paragraphs[language].get((page, pid))
            if not text:
                raise KeyError(f"paragraph {pid} of {page} is missing in libreoffice-help-{language}")
            if language != HELP_LANGUAGES[0] and text == english:
                raise ValueError(f"paragraph {pid} of {page} is not translated in libreoffice-help-{language}")
            prompt, completion = split_text(text, language)
            out.append({"id": f"{group}-{language}", "kind": "translated (help)", "group": group, "language": language, "prompt": prompt, "completion": completion})
    return out


def capital_queries() -> list[Q]:
    return [
        {"id": f"capital-{lang}", "kind": "translated (general)", "group": "capital-france", "language": lang, "prompt": p, "completion": c}
        for lang, (p, c) in CAPITAL.items()
    ]


def check_queries(queries: Iterable[Q], pairs: Iterable[Mapping] = ()) -> None:
    """Raise ValueError unless the queries are well formed for the study.

    Unique non-empty ids; non-empty prompt, completion and kind; group and
    language given together; no two queries of one group in the same language;
    every pair names a known query and has two different forms.
    """
    queries = list(queries)
    ids = [q.get("id") for q in queries]
    if len(set(ids)) != len(ids) or not all(ids):
        raise ValueError("query ids must be unique and non-empty")
    seen: set[tuple[str, str]] = set()
    for q in queries:
        for field in ("prompt", "completion", "kind"):
            if not isinstance(q.get(field), str) or not q[field].strip():
                raise ValueError(f"query {q['id']}: empty {field}")
        if ("group" in q) != ("language" in q):
            raise ValueError(f"query {q['id']}: group and language go together")
        if "group" in q:
            key = (q["group"], q["language"])
            if key in seen:
                raise ValueError(f"group {q['group']} has two queries in {q['language']}")
            seen.add(key)
    for p in pairs:
        if p["query_id"] not in ids:
            raise ValueError(f"pair {p['id']} names the unknown query {p['query_id']}")
        if p["statement"].strip() == p["flipped"].strip():
            raise ValueError(f"pair {p['id']}: statement and flipped are the same")


def write_jsonl(path: Path, rows: Iterable[Mapping]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


__all__ = [
    "SMOLLM2_QUERIES", "SMOLLM2_PAIRS", "BIBLE_REFS", "HELP_PARAGRAPHS", "HELP_LANGUAGES", "CAPITAL",
    "split_text", "bible_queries", "help_queries", "capital_queries", "check_queries", "write_jsonl",
]  # fmt: skip
