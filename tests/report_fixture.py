"""Run directories for the report tests, made by the library's own writers.

``real_run`` fits and scores a tiny GPT-2 (its own byte-level BPE tokenizer) on a
corpus of accents, CJK and emoji with the command line, so run.json, config.yaml,
corpus/ and the score tables are exactly what `lminfluence` writes. ``make_run``
copies it and rewrites the score tables through ``workflow.tables.write_tables``
with designed scores, so tests know what the page must show:

- query 0 (``capital``) has 4 positive and 2 negative sequences; its rank-1 sequence is
  the first chunk of ``capital.txt`` with the strongest positive token on "Paris"
  (+2), the strongest negative on "capital" (-2), and a ``<script>`` in its text;
- query 1 (``html<b>``) has a spurious rank-2 sequence (one token holds all its score);
- queries 0 and 2 (``capitale``) share the group ``capital`` (en / fr);
- query 3 (``tokyo``) shows the CJK and emoji documents.

``write_analysis`` writes the analysis tables as docs/run-directory.md ("analysis/")
specifies them, computed from the score tables with plain numpy.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_fixture import corpus_texts, train_tokenizer, write_jsonl

from lminfluence.cli.main import main
from lminfluence.corpus import SequenceStore
from lminfluence.corpus.readers import read_queries
from lminfluence.storage import layout
from lminfluence.scoring.two_stage import Shown
from lminfluence.workflow.tables import block_of, token_texts, write_tables

MAX_LENGTH = 40
STRONG_POS, STRONG_NEG = "Paris", "capital"  # the extreme tokens of card q0-p1
MULTIBYTE = "Café naïve résumé — “quotes” … 東京は日本の首都です。 emoji 😀🎉 👩‍👩‍👧 ok ‘x’ – ½ ﬁ"
DOCS = {
    "capital.txt": "The capital of France is Paris.\nNot Berlin <script>alert('x')</script>\nat all.",
    "cafe.txt": "Café naïve résumé — “quotes” … the café in Paris serves crème brûlée. " * 3,
    "tokyo.txt": "東京は日本の首都です。 Tokyo is the capital of Japan 🗼. 日本語の文章です。",
    "emoji.txt": "emoji 😀🎉 👩‍👩‍👧 family ok ‘x’ – ½ ﬁ. The capital of emoji is 😀.",
    "escape.txt": "Escape <b>this</b> & that: done and dusted.",
}
QUERIES = [
    {"id": "capital", "prompt": "The capital of France is", "completion": " Paris", "group": "capital", "language": "en"},
    {"id": "html<b>", "prompt": "Escape <b>this</b> & that:", "completion": " done"},
    {"id": "capitale", "prompt": "La capitale de la France est", "completion": " Paris", "group": "capital", "language": "fr"},
    {"id": "tokyo", "prompt": "東京は", "completion": "日本の首都です。"},
]
# query index → (positive count, negative count)
SHOWN = {0: (4, 2), 1: (3, 1), 2: (4, 2), 3: (3, 0)}
LAYER_SPLIT = np.array([0.5, -0.25, 0.125, 0.625])  # each score's split over the four tracked layers


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder holding the real tiny run that ``make_run`` copies (made by the first test that asks)."""
    root = tmp_path_factory.getbasetemp() / "report-real"
    root.mkdir(exist_ok=True)
    real_run(root)
    return root


def real_run(root: Path) -> Path:
    """Fit and score the tiny model with the command line (cached under ``root``)."""
    run = root / "real"
    if (run / layout.QUERIES_TABLE).is_file():
        return run
    texts = list(DOCS.values()) + corpus_texts(12)
    model = make_model_dir(root, texts)
    corpus = write_jsonl(root / "corpus.jsonl", [{"id": k, "text": v} for k, v in DOCS.items()] + [{"id": f"filler-{i}", "text": t} for i, t in enumerate(corpus_texts(12))])
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    assert main(["fit", "--model", str(model), "--corpus", str(corpus), "--max-length", str(MAX_LENGTH), "-o", str(run), "-q"]) == 0
    assert main(["score", "-o", str(run), "--queries", str(queries), "--top", "5", "--save-matrix", "-q"]) == 0
    return run


def make_model_dir(root: Path, texts: list[str]) -> Path:
    """A 2-block GPT-2 with a byte-level BPE tokenizer of 420 ids trained on ``texts`` (merges inside words and characters)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(texts, vocab_size=420)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    path = root / "model"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tokenizer_of(run: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(json.loads((run / layout.RUN_MANIFEST).read_text())["model"]["path"])


def _seq(store: SequenceStore, doc: str, chunk: int = 0) -> int:
    return next(i for i in range(len(store)) if store.doc_id[i] == doc and store.chunk[i] == chunk)


def token_index(pieces: list[str], needle: str) -> int:
    """The first token whose text contains the start of ``needle``."""
    return next(i for i, t in enumerate(pieces) if t and needle.startswith(t.strip()) and t.strip())


def designed_sequences(store: SequenceStore) -> dict[int, list[int]]:
    """Query → the sequences it shows, most positive first (then the negative ones)."""
    filler = [i for i in range(len(store)) if store.doc_id[i].startswith("filler") and len(store.tokens(i)) >= 8]
    return {
        0: [_seq(store, "capital.txt"), _seq(store, "cafe.txt"), _seq(store, "emoji.txt"), _seq(store, "tokyo.txt"), filler[0], filler[1]],
        1: [_seq(store, "escape.txt"), filler[2], filler[3], filler[4]],
        2: [_seq(store, "cafe.txt"), _seq(store, "capital.txt"), filler[5], _seq(store, "emoji.txt"), filler[0], filler[6]],
        3: [_seq(store, "tokyo.txt"), _seq(store, "emoji.txt"), _seq(store, "cafe.txt", 1)],
    }


def designed_token_scores(query: int, j: int, pieces: list[str], rng: np.random.Generator) -> np.ndarray:
    """Token scores of the j-th shown sequence of a query: totals 1/(1+j) for the positive ones, then -0.5, -0.25 …"""
    n, positive = len(pieces), SHOWN[query][0]
    target = 1.0 / (1 + j) if j < positive else -0.5 / (1 + j - positive)
    scores = np.abs(rng.normal(0.0, 1.0, n)) * np.sign(target)
    fixed = np.zeros(n, dtype=bool)
    fixed[-1], scores[-1] = True, 0.0  # the last token predicts nothing
    if query == 0 and j == 0:  # the card the colour tests read: the extremes on STRONG_POS and STRONG_NEG
        for needle, value in ((STRONG_POS, 2.0), (STRONG_NEG, -2.0)):
            i = token_index(pieces, needle)
            fixed[i], scores[i] = True, value
    if query == 1 and j == 1:  # spurious: one token holds the whole score
        scores[:] = 0.0
        scores[1] = target
        return scores
    scores[~fixed] *= (target - scores[fixed].sum()) / scores[~fixed].sum()
    return scores


def make_run(path: Path, root: Path) -> Path:
    """A copy of the real tiny run with designed score tables (see the module docstring)."""
    real = real_run(root)
    shutil.copytree(real, path)
    store = SequenceStore.load(path)
    tokenizer = tokenizer_of(path)
    queries = read_queries(root / "queries.jsonl")
    layers = list(dict.fromkeys(pq.read_table(real / layout.LAYERS_TABLE, columns=["layer"]).column("layer").to_pylist()))
    rng = np.random.default_rng(0)
    union = np.arange(len(store))
    first = rng.normal(0.0, 0.02, (len(queries), len(store)))
    shown = []
    sequences = designed_sequences(store)
    for q in range(len(queries)):
        seqs = sequences[q]
        pieces = token_texts(tokenizer, [store.text[s] for s in seqs], [store.tokens(s) for s in seqs])
        per_token = [designed_token_scores(q, j, p, rng) for j, p in enumerate(pieces)]
        total = np.array([t.sum() for t in per_token])
        positive, negative = SHOWN[q]
        ranks = np.r_[np.arange(1, positive + 1), -np.arange(1, negative + 1)]
        T = max(len(t) for t in per_token)
        padded = np.zeros((len(seqs), T))
        for j, t in enumerate(per_token):
            padded[j, : len(t)] = t
        first[q, seqs] = total * 0.98
        shown.append(Shown(np.array(seqs), ranks, total, {name: total * LAYER_SPLIT[i] for i, name in enumerate(layers)}, padded))
    logp = -1.5 - np.arange(len(queries), dtype=float)
    write_tables(path, queries, logp, first, shown, None, union, store, tokenizer, save_matrix=True)
    return path


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def write_analysis(run: Path) -> None:
    """The analysis tables of the contract, computed from the score tables with plain numpy."""
    from scipy.stats import spearmanr

    queries = pq.read_table(run / layout.QUERIES_TABLE).to_pylist()
    matrix = pq.read_table(run / layout.MATRIX_TABLE).to_pandas()
    top = pq.read_table(run / layout.TOP_TABLE).to_pandas()
    layers = pq.read_table(run / layout.LAYERS_TABLE).to_pandas()
    tokens = pq.read_table(run / layout.TOKENS_TABLE).to_pandas()
    names = list(dict.fromkeys(layers.layer))
    names.sort(key=lambda n: block_of(n))
    third = {n: ("lower", "middle", "upper")[i] for i, part in enumerate(np.array_split(np.array(names), 3)) for n in part}
    sparsity, shares, thirds, spurious, cross = [], [], [], [], []
    for q in queries:
        qi = q["query_index"]
        s = np.sort(matrix[matrix.query_index == qi].score.to_numpy().astype(float))[::-1]
        pos = s[s > 0]
        x_min = float(np.median(pos))
        tail = pos[pos >= x_min]
        alpha = 1 + len(tail) / float(np.log(tail / x_min).sum())
        shares_k = {f: float(pos[: max(1, math.ceil(f * len(s)))].sum() / pos.sum()) for f in (0.001, 0.01, 0.1)}
        sparsity.append({
            "query_index": qi, "query_id": q["query_id"], "num_scored": len(s), "num_positive": len(pos),
            "alpha": alpha, "x_min": x_min, "tail_size": len(tail), "ks": 0.05,
            "share_top_0_1pct": shares_k[0.001], "share_top_1pct": shares_k[0.01], "share_top_10pct": shares_k[0.1],
            "curve_rank": list(range(1, len(pos) + 1)), "curve_score": pos.tolist(),
        })  # fmt: skip
        shown = top[(top.query_index == qi) & (top["rank"] > 0)]
        mine = layers[(layers.query_index == qi) & layers.seq_index.isin(shown.seq_index)]
        per_layer = mine.groupby("layer").score.sum()
        for n in names:
            shares.append({"query_index": qi, "query_id": q["query_id"], "layer": n, "block": block_of(n), "third": third[n], "share": float(per_layer[n] / per_layer.sum())})
        row = {"query_index": qi, "query_id": q["query_id"]}
        for t in ("lower", "middle", "upper"):
            row[f"share_{t}"] = float(sum(per_layer[n] for n in names if third[n] == t) / per_layer.sum())
            restricted = mine[mine.layer.map(third) == t].groupby("seq_index").score.sum()
            full = shown.set_index("seq_index").score.loc[restricted.index]
            row[f"spearman_{t}"] = float(spearmanr(full, restricted).statistic) if len(full) >= 3 else float("nan")
        thirds.append(row)
        for r in top[top.query_index == qi].itertuples():
            a = tokens[(tokens.query_index == qi) & (tokens.seq_index == r.seq_index)].score.to_numpy()
            ratio = float(np.linalg.norm(a) / np.abs(a).sum())
            spurious.append({"query_index": qi, "seq_index": r.seq_index, "rank": r.rank, "l2_l1": ratio, "spurious": ratio > 2 / 3})
    by_group: dict[str, list[dict]] = {}
    for q in queries:
        if q["group"] is not None:
            by_group.setdefault(q["group"], []).append(q)
    k = 3
    for g, qs in by_group.items():
        if len({q["language"] for q in qs if q["language"] is not None}) < 2:
            continue  # the contract: only groups with two languages or more
        for a in qs:
            for b in qs:
                if a is b:
                    continue
                sa = matrix[matrix.query_index == a["query_index"]].set_index("seq_index").score
                sb = matrix[matrix.query_index == b["query_index"]].set_index("seq_index").score
                ta, tb = sa.nlargest(k).index, sb.nlargest(k).index
                union = ta.union(tb)
                cross.append({
                    "group": g, "language_from": a["language"], "language_to": b["language"], "query_from": a["query_id"],
                    "query_to": b["query_id"], "k": k, "captured": float(sb[ta].sum() / sb[tb].sum()),
                    "overlap": len(ta.intersection(tb)) / k, "spearman": float(spearmanr(sa[union], sb[union]).statistic),
                })  # fmt: skip
    out = run / "analysis"
    out.mkdir(exist_ok=True)
    pq.write_table(_table(sparsity, SPARSITY_SCHEMA), out / "sparsity.parquet")
    pq.write_table(_table(shares, LAYERS_SCHEMA), out / "layers.parquet")
    pq.write_table(_table(thirds, THIRDS_SCHEMA), out / "thirds.parquet")
    pq.write_table(_table(spurious, SPURIOUS_SCHEMA), out / "spurious.parquet")
    pq.write_table(_table(cross, CROSSLINGUAL_SCHEMA), out / "crosslingual.parquet")


F64, I32, I64, STR = pa.float64(), pa.int32(), pa.int64(), pa.string()
SPARSITY_SCHEMA = pa.schema([
    ("query_index", I32), ("query_id", STR), ("num_scored", I64), ("num_positive", I64), ("alpha", F64), ("x_min", F64),
    ("tail_size", I64), ("ks", F64), ("share_top_0_1pct", F64), ("share_top_1pct", F64), ("share_top_10pct", F64),
    ("curve_rank", pa.list_(I64)), ("curve_score", pa.list_(F64)),
])  # fmt: skip
LAYERS_SCHEMA = pa.schema([("query_index", I32), ("query_id", STR), ("layer", STR), ("block", I32), ("third", STR), ("share", F64)])
THIRDS_SCHEMA = pa.schema([
    ("query_index", I32), ("query_id", STR), ("share_lower", F64), ("share_middle", F64), ("share_upper", F64),
    ("spearman_lower", F64), ("spearman_middle", F64), ("spearman_upper", F64),
])  # fmt: skip
SPURIOUS_SCHEMA = pa.schema([("query_index", I32), ("seq_index", I64), ("rank", I32), ("l2_l1", F64), ("spurious", pa.bool_())])
CROSSLINGUAL_SCHEMA = pa.schema([
    ("group", STR), ("language_from", STR), ("language_to", STR), ("query_from", STR), ("query_to", STR), ("k", I32),
    ("captured", F64), ("overlap", F64), ("spearman", F64),
])  # fmt: skip


def _word_sampler(rng: np.random.Generator):
    """Words with their frequencies in Python's own reference prose (pydoc_data), for text of realistic word lengths."""
    import collections
    import pydoc_data.topics
    import re

    counts = collections.Counter(re.findall(r"\S+", " ".join(pydoc_data.topics.topics.values())))
    words = list(counts)
    p = np.array([counts[w] for w in words], dtype=float)
    return lambda n: [words[i] for i in rng.choice(len(words), size=n, p=p / p.sum())]


def make_budget_run(path: Path, root: Path, *, queries: int, per_side: int, tokens: int, sequences: int, seed: int = 0) -> dict:
    """A run of ``queries`` queries showing ``per_side`` + ``per_side`` sequences of ``tokens`` tokens each.

    The corpus has ``sequences`` sequences of words drawn by their frequency in Python's
    reference prose (no long repeats for compression to exploit); each query shows
    2·per_side of them drawn without replacement, and with ``sequences`` = queries · 2 ·
    per_side no sequence is shown twice (the worst case for the page size). Token scores
    are Laplace-distributed (most near zero, a heavy tail). run.json and config.yaml come
    from the real tiny run; the tables from ``write_tables``.

    Returns:
        Facts for the test's message: tokens shown, distinct sequences, characters per token.
    """
    from lminfluence.corpus.readers import Document, Query

    rng = np.random.default_rng(seed)
    real = real_run(root)
    path.mkdir(parents=True)
    for rel in (layout.RUN_MANIFEST, layout.RUN_CONFIG):
        shutil.copy(real / rel, path / rel)
    words = _word_sampler(rng)
    sample = " ".join(words(200_000))
    tokenizer = train_tokenizer([sample[i : i + 10_000] for i in range(0, len(sample), 10_000)], vocab_size=4096)
    per_doc = int(tokens * 1.2)  # words per document: a full sequence and the start of a second
    docs = [Document(f"doc-{i:05d}", " ".join(words(per_doc))) for i in range(sequences)]
    store = SequenceStore.build(docs, tokenizer, tokens, progress=False)
    store.save(path)
    full = [i for i in range(len(store)) if len(store.tokens(i)) == tokens]
    layers = [f"transformer.h.{b}.mlp.{n}" for b in range(12) for n in ("c_fc", "c_proj")]
    qs = [Query(f"q{i}", f"The prompt of query {i} is", " its completion") for i in range(queries)]
    pool = rng.permutation(full) if len(full) >= queries * 2 * per_side else None
    first = rng.laplace(0.0, 1.0, (queries, len(store)))
    shown = []
    for q in range(queries):
        seqs = pool[q * 2 * per_side : (q + 1) * 2 * per_side] if pool is not None else rng.choice(full, 2 * per_side, replace=False)
        per_token = rng.laplace(0.0, 1.0, (2 * per_side, tokens))
        per_token[:, -1] = 0.0
        per_token[:per_side] = np.abs(per_token[:per_side])
        per_token[per_side:] = -np.abs(per_token[per_side:])
        total = per_token.sum(1)
        order = np.r_[np.argsort(-total[:per_side]), per_side + np.argsort(total[per_side:])]
        per_token, total, seqs = per_token[order], total[order], np.asarray(seqs)[order]
        split = rng.dirichlet(np.ones(len(layers)))
        ranks = np.r_[np.arange(1, per_side + 1), -np.arange(1, per_side + 1)]
        shown.append(Shown(seqs, ranks, total, {n: total * split[i] for i, n in enumerate(layers)}, per_token))
    write_tables(path, qs, -np.ones(queries), first, shown, None, np.arange(len(store)), store, tokenizer, save_matrix=True)
    shown_seqs = {int(s) for sh in shown for s in sh.indices}
    return {
        "tokens_shown": queries * 2 * per_side * tokens,
        "distinct_sequences": len(shown_seqs),
        "chars_per_token": sum(len(store.text[s]) for s in shown_seqs) / (len(shown_seqs) * tokens),
    }
