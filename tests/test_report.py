"""The HTML report, read as text and as data: content, cards, escaping, self-containment, numbers, errors.

The run directories come from report_fixture: a real tiny fit + score, its score
tables rewritten by ``write_tables`` with designed scores. The browser side is in
test_report_browser.py.
"""

from __future__ import annotations

import itertools
import math
import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from cli_fixture import train_tokenizer
from report_fixture import DOCS, MULTIBYTE, QUERIES, SHOWN, make_budget_run, make_run, shared_root, write_analysis

from lminfluence.report import load as report_load
from lminfluence.report import write_report
from lminfluence.report.colours import CARD_HEAD, COOL, LEVELS, MIN_CONTRAST, MUTED, NEG_TEXT, POS_TEXT, WARM, contrast, level, level_colours, mix
from lminfluence.report.numbers import column_format, number, percent
from lminfluence.report.page import layer_patterns
from lminfluence.report.payload import QUANT, decode, lengths_text
from lminfluence.report.plots import power_law_line
from lminfluence.storage import layout
from lminfluence.workflow.tables import token_texts

VOID = {"meta", "br", "img", "input", "link", "hr", "wbr"}
DEMO_BUDGET = 3_000_000  # bytes: 52 queries × 20 cards × ≤ 128 tokens
LARGE_BUDGET = 15_000_000  # bytes: 200 queries × 20 cards × 512 tokens


class Tree(HTMLParser):
    """Elements with their attributes, ancestors and text: enough to query the report without a DOM library."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self.stack: list[dict] = []

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "parents": list(self.stack), "text": []}
        el["classes"] = set((el["attrs"].get("class") or "").split())
        self.elements.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"].append(data)

    def find(self, tag=None, cls=None, inside=None):
        """Elements of a tag/class, optionally under the element with id ``inside``."""
        return [
            e
            for e in self.elements
            if (tag is None or e["tag"] == tag)
            and (cls is None or cls in e["classes"])
            and (inside is None or any(p["attrs"].get("id") == inside for p in e["parents"]))
        ]

    def by_id(self, id_: str) -> dict:
        (el,) = [e for e in self.elements if e["attrs"].get("id") == id_]
        return el


def parse(html: str) -> Tree:
    tree = Tree()
    tree.feed(html)
    return tree


def text(el: dict) -> str:
    return "".join(el["text"])


@pytest.fixture(scope="module")
def report_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_root(tmp_path_factory)


@pytest.fixture()
def run(report_root: Path, tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", report_root)


@pytest.fixture()
def analysed(run: Path) -> Path:
    write_analysis(run)
    return run


def tables(run: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run / f"scores/{t}.parquet") for t in ("queries", "top", "layers", "tokens", "matrix")}


# ---- token texts (workflow/tables.py) ----


def test_token_texts_concatenate_to_the_text_with_every_character():
    """Byte-level BPE splits accents, CJK and emoji over several tokens; the pieces still add up to the text.

    No piece holds U+FFFD, a character split over tokens goes to the first of them
    (the others get ""), and every piece is a run of whole characters.
    """
    texts = [*DOCS.values(), MULTIBYTE]
    tok = train_tokenizer(texts, vocab_size=420)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty = 0
    for t, i, pieces in zip(texts, ids, token_texts(tok, texts, ids)):
        assert "".join(pieces) == t and len(pieces) == len(i)
        assert not any("\ufffd" in p for p in pieces)
        empty += sum(p == "" for p in pieces)
    assert empty > 0  # the corpus does split characters: the test exercises that case
    assert any("\ufffd" in tok.decode([x]) for i in ids for x in i)  # what decoding each token alone gives


def test_token_texts_align_a_sequence_cut_inside_a_character_and_a_bos_prefix():
    """A chunk that starts and ends inside a character, and a BOS in front, still gives the exact text.

    This is how SequenceStore cuts documents: at token boundaries that may fall
    inside a character's bytes, so the chunk's text tokenizes differently alone.
    """
    tok = train_tokenizer([MULTIBYTE], vocab_size=300)
    enc = tok(MULTIBYTE, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [k for k in range(1, len(ids)) if offsets[k][0] < offsets[k - 1][1]]  # token k starts inside a character
    assert len(inside) >= 2
    a, b = inside[0], inside[-1]
    stored = ids[a:b]
    chunk = MULTIBYTE[offsets[a][0] : offsets[b - 1][1]]
    (pieces,) = token_texts(tok, [chunk], [stored])
    assert "".join(pieces) == chunk and len(pieces) == len(stored)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    (with_bos,) = token_texts(tok, [MULTIBYTE], [[bos, *ids]])
    assert with_bos[0] == "" and "".join(with_bos) == MULTIBYTE


def test_tokens_table_holds_each_sequence_text_exactly(run: Path):
    """tokens.parquet's pieces of every shown sequence concatenate to its text in top.parquet and sequences.parquet."""
    t = tables(run)
    seqs = pd.read_parquet(run / layout.SEQUENCES_FILE).set_index("seq_index").text
    joined = t["tokens"].sort_values("position").groupby(["query_index", "seq_index"]).token.apply("".join)
    top = t["top"].set_index(["query_index", "seq_index"]).text
    assert len(joined) == len(top)
    for key, value in joined.items():
        assert value == top[key] == seqs[key[1]]
    assert not t["tokens"].token.str.contains("\ufffd").any()
    assert any(ord(c) > 0xFFFF for c in "".join(t["tokens"].token))  # emoji are among the shown tokens


# ---- structure ----


@pytest.mark.parametrize("top", [1, 2, 10])
def test_every_query_has_its_section_and_min_top_rows_cards(run: Path, top: int):
    """Per query: min(top, positive rows) cards outside <details>, min(top, negative rows) inside, under a heading."""
    tree = parse(write_report(run, top=top).read_text())
    for qi, q in enumerate(QUERIES):
        section = tree.by_id(f"q-{qi}")
        cards = tree.find("article", "card", inside=f"q-{qi}")
        negative = [c for c in cards if any(p["tag"] == "details" for p in c["parents"])]
        positive, n_negative = SHOWN[qi]
        assert len(cards) - len(negative) == min(top, positive), q["id"]
        assert len(negative) == min(top, n_negative), q["id"]
        assert [c["attrs"]["id"] for c in cards] == [f"q{qi}-p{r}" for r in range(1, min(top, positive) + 1)] + [
            f"q{qi}-n{r}" for r in range(1, min(top, n_negative) + 1)
        ]
        assert q["prompt"] in text(section) and q["completion"] in text(section)
        headings = [text(h) for h in tree.find("h3", inside=f"q-{qi}")]
        assert any(h.startswith("Most positive influence") for h in headings)
        assert any(h.startswith("Most negative influence") for h in headings)
        links = {a["attrs"].get("href") for a in tree.find("a", inside="index")}
        assert f"#q-{qi}" in links and f"#q{qi}-p1" in links  # the top document links to its card
    assert len(tree.find("section", "query")) == len(QUERIES)


def test_default_output_is_run_report_index_and_written_atomically(run: Path, tmp_path: Path):
    out = write_report(run)
    assert out == run / layout.REPORT_FILE and out.is_file()
    assert write_report(run) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]  # no temporary file left behind
    custom = write_report(run, output=tmp_path / "elsewhere" / "r.html")
    assert custom.read_text() == out.read_text()  # and the same run gives the same page, byte for byte


def test_self_contained_no_external_resource(run: Path):
    """Nothing is fetched: no URL, link, import, image or frame; the only scripts are the data and the inline client."""
    write_analysis(run)
    html = write_report(run).read_text()
    for bad in ("http://", "https://", "<link", "@import", "url(", " src=", "<img", "<iframe", "fetch(", "XMLHttpRequest", "import(", "WebSocket"):
        assert bad not in html, bad
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts == ['<script type="application/octet-stream" id="data" data-encoding="gzip+base85">', "<script>"]
    assert "<style>" in html and "<svg" in html


def test_escaping_of_texts_and_ids(run: Path):
    html = write_report(run).read_text()
    assert '<span class="qid">html&lt;b&gt;</span>' in html
    assert "Escape &lt;b&gt;this&lt;/b&gt; &amp; that:" in html and "<b>this</b>" not in html
    assert "alert(" not in html  # the document's <script> is data, compressed
    (capital,) = [chunks for doc_id, chunks in decode(html)["docs"] if doc_id == "capital.txt"]
    assert "<script>alert('x')</script>" in capital[0][4]


# ---- the embedded data ----


def test_payload_rebuilds_every_card_and_its_scores(run: Path):
    """Each card's tokens (text cut by its lengths) and scores, as the script reads them, match tokens.parquet.

    Quantised token scores are within half a step (card peak / (2 QUANT)); block
    scores keep three significant digits of top.parquet's block_scores.
    """
    html = write_report(run).read_text()
    data, tree, t = decode(html), parse(html), tables(run)
    text_of = {chunk[0]: chunk[4] for doc in data["docs"] for chunk in doc[1]}
    order = t["top"].assign(neg=t["top"]["rank"] < 0, r=t["top"]["rank"].abs()).sort_values(["query_index", "neg", "r"])
    assert [int(c["attrs"]["data-k"]) for c in tree.find("article", "card")] == list(range(len(order)))
    for k, row in enumerate(order.itertuples()):
        seq, qpos, peak, quantised, blocks = data["cards"][k]
        assert (seq, qpos) == (row.seq_index, row.query_index)
        lengths = [ord(c) - 48 for c in data["seqs"][str(seq)][1]]  # no token of these is longer than 74
        assert data["seqs"][str(seq)][1] == lengths_text(lengths)
        units = text_of[seq].encode("utf-16-le")
        cuts = np.r_[0, np.cumsum(lengths)] * 2
        tokens = [units[a:b].decode("utf-16-le") for a, b in itertools.pairwise(cuts)]
        expected = t["tokens"][(t["tokens"].query_index == row.query_index) & (t["tokens"].seq_index == seq)].sort_values("position")
        assert tokens == expected.token.tolist()
        scores = expected.score.to_numpy()
        assert peak == pytest.approx(np.abs(scores).max())
        np.testing.assert_allclose(np.array(quantised) * peak / QUANT, scores, atol=peak / (2 * QUANT) * (1 + 1e-9))
        np.testing.assert_allclose(blocks, row.block_scores, rtol=5e-3)
    for q, (qpeak, _, numbers) in enumerate(data["queries"]):
        assert qpeak == max(data["cards"][k][2] for k in numbers)
    assert data["peak"] == max(c[2] for c in data["cards"]) and data["levels"] == LEVELS


def test_full_documents_are_embedded_once_with_every_chunk(run: Path, monkeypatch: pytest.MonkeyPatch):
    """Each shown document comes with all its chunks in order, each text once; with no context share, the shown ones only."""
    seqs = pd.read_parquet(run / layout.SEQUENCES_FILE)
    shown = set(tables(run)["top"].doc_id)
    docs = decode(write_report(run).read_text())["docs"]
    assert sorted(d[0] for d in docs) == sorted(shown)
    for doc_id, chunks in docs:
        rows = seqs[seqs.doc_id == doc_id].sort_values("chunk")
        assert [c[:4] for c in chunks] == rows[["seq_index", "chunk", "char_start", "char_end"]].values.tolist()
        assert [c[4] for c in chunks] == rows.text.tolist()
    assert max(len(c) for _, c in docs) >= 2  # a document cut into several chunks is among them
    monkeypatch.setattr(report_load, "CONTEXT_SHARE", 0.0)
    top = tables(run)["top"]
    docs = decode(write_report(run).read_text())["docs"]
    assert sorted(c[0] for _, chunks in docs for c in chunks) == sorted(set(top.seq_index))


# ---- colours and numbers ----


def test_every_heatmap_level_has_readable_ink_in_the_page(run: Path):
    """WCAG contrast ≥ 4.5 between each level's background and its ink; the page's CSS carries exactly these rules."""
    html = write_report(run).read_text()
    colours = level_colours()
    assert len(colours) == 2 * LEVELS
    for cls, (bg, ink) in colours.items():
        assert contrast(bg, ink) >= MIN_CONTRAST, (cls, bg, ink, contrast(bg, ink))
        assert f".heat .{cls}{{background:{bg};color:{ink}}}" in html
    assert colours[f"p{LEVELS}"][0] == "#{:02x}{:02x}{:02x}".format(*WARM)
    assert colours[f"n{LEVELS}"][0] == "#{:02x}{:02x}{:02x}".format(*COOL)
    assert colours["p20"][1] != "#ffffff"  # warm levels keep dark ink (white on them was 2.2–4.3:1)


def test_text_colours_are_readable():
    for ink in (MUTED, POS_TEXT, NEG_TEXT):
        for background in ("#ffffff", CARD_HEAD, "#f6f6f4", "#fff1e6"):
            assert contrast(ink, background) >= MIN_CONTRAST, (ink, background)
    assert contrast("#5c4200", "#fff3cd") >= MIN_CONTRAST  # the spurious badge
    assert contrast("#4a3b10", "#fff8e6") >= MIN_CONTRAST  # the banner


def test_colour_scale_and_levels():
    assert mix(1.0) == WARM and mix(-1.0) == COOL and mix(0.0) == (255, 255, 255) and mix(2.0) == WARM
    assert level(1.0) == f"p{LEVELS}" and level(-1.0) == f"n{LEVELS}"
    assert level(0.0) == "" and level(0.4 / LEVELS) == "" and level(float("nan")) == ""
    assert level(0.5) == f"p{LEVELS // 2}" and level(-0.5) == f"n{LEVELS // 2}"
    assert level(0.5 / LEVELS) == "p1"  # half up, as the page's script rounds


def test_one_number_format_per_column():
    fmt = column_format([877, 1566, -17512, 3.2])
    assert [fmt(x, True) for x in (877, 1566, -17512, 3.2)] == ["+877", "+1566", "-17512", "+3"]
    fmt = column_format([0.05, -0.001])
    assert [fmt(x, True) for x in (0.05, -0.001)] == ["+0.0500", "-0.0010"]
    fmt = column_format([1e-6, -3e-7])
    assert [fmt(x, True) for x in (1e-6, -3e-7)] == ["+1.00e-06", "-3.00e-07"]
    assert number(0.123456) == "0.123" and number(float("nan")) == "n/a" and percent(0.4481) == "44.8%"
    for s in ("+877", "-17512", "-3.00e-07"):
        assert float(s) == float(s.replace("+", ""))  # pastes as a number


def test_index_column_has_one_format_and_no_typographic_minus(run: Path):
    html = write_report(run).read_text()
    assert "\u2212" not in html
    tree = parse(html)
    scores = [text(a) for a in tree.find("a", inside="index") if a["classes"] & {"pos", "neg"}]
    assert len(scores) == len(QUERIES)
    assert len({len(s.partition(".")[2]) for s in scores}) == 1  # the same decimals down the column
    assert all(math.isfinite(float(s)) for s in scores)


def test_header_from_run_json_and_config(run: Path):
    """The summary reads run.json and config.yaml as `lminfluence` wrote them; the title names model and run."""
    import json

    import yaml

    manifest = json.loads((run / layout.RUN_MANIFEST).read_text())
    config = yaml.safe_load((run / layout.RUN_CONFIG).read_text())
    html = write_report(run).read_text()
    tree = parse(html)
    summary = {text(d["parents"][-1]).replace(text(d), "", 1): text(d) for d in tree.find("dd")}
    model = "/".join(Path(manifest["model"]["path"]).parts[-2:])
    assert summary["model"] == model
    assert summary["model fingerprint"] == manifest["model"]["fingerprint"][:16]
    assert summary["strategy"] == manifest["fit"]["strategy"] == "ekfac"
    assert summary["damping"].startswith(f"{config['score']['damping_scale']} × mean eigenvalue")
    corpus = manifest["corpus"]
    assert summary["corpus"] == f"{corpus['num_documents']} documents · {corpus['num_sequences']} sequences of ≤ {corpus['max_length']} tokens"
    assert summary["queries"] == str(len(QUERIES)) and summary["lminfluence"] == manifest["versions"]["lminfluence"]
    assert f"fit {manifest['fit']['seconds']:.1f} s" in summary["time"]
    title = re.search(r"<title>(.*?)</title>", html).group(1)
    assert model in unescape(title) and run.name in title
    layers = list(dict.fromkeys(pd.read_parquet(run / layout.LAYERS_TABLE).layer))
    assert f"{len(layers)} tracked layers" in html
    assert "share in predicting the <b>next</b> token" in html


def test_layer_patterns():
    layers = [(f"transformer.h.{b}.mlp.{n}", b) for b in range(4) for n in ("c_fc", "c_proj")] + [("lm_head", -1)]
    assert layer_patterns(layers) == ["transformer.h.*.mlp.c_fc (blocks 0–3)", "transformer.h.*.mlp.c_proj (blocks 0–3)", "lm_head"]
    assert layer_patterns([("model.layers.1.up", 1), ("model.layers.3.up", 3), ("model.layers.4.up", 4)]) == ["model.layers.*.up (blocks 1, 3–4)"]


# ---- errors ----


@pytest.mark.parametrize(
    ("rel", "command"),
    [
        (layout.RUN_MANIFEST, "lminfluence score"),
        (layout.RUN_CONFIG, "lminfluence score"),
        (layout.QUERIES_TABLE, "lminfluence score"),
        (layout.TOP_TABLE, "lminfluence score"),
        (layout.TOKENS_TABLE, "lminfluence score"),
        (layout.LAYERS_TABLE, "lminfluence score"),
        (layout.SEQUENCES_FILE, "lminfluence fit"),
    ],
)
def test_missing_file_names_it_and_the_command(run: Path, rel: str, command: str):
    (run / rel).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(rel) + ".*" + command):
        write_report(run)
    assert not (run / layout.REPORT_FILE).exists()


def test_missing_column_is_named(run: Path):
    pq.write_table(pq.read_table(run / layout.TOP_TABLE).drop_columns(["block_scores"]), run / layout.TOP_TABLE)
    with pytest.raises(ValueError, match="top.parquet lacks column.*block_scores"):
        write_report(run)


def test_tables_of_another_writer_are_refused(run: Path):
    """Token texts that do not add up to the sequence (an lminfluence that decoded tokens alone) are an error, not a garbled page."""
    table = pq.read_table(run / layout.TOKENS_TABLE).to_pandas()
    table.loc[0, "token"] = "\ufffd"
    table.to_parquet(run / layout.TOKENS_TABLE)
    with pytest.raises(ValueError, match="do not add up.*score --overwrite"):
        write_report(run)
    table[table.seq_index != table.seq_index[0]].to_parquet(run / layout.TOKENS_TABLE)
    with pytest.raises(ValueError, match="no token rows"):
        write_report(run)


def test_top_must_be_positive(run: Path):
    with pytest.raises(ValueError, match="top must be a positive integer"):
        write_report(run, top=0)


# ---- charts and analyses ----


def test_histogram_counts_on_a_log_axis(run: Path):
    """Bar heights grow with log10(count) from a base of 0.5, so a bin of one sequence is visible."""
    tree = parse(write_report(run).read_text())
    svg = tree.find("svg", "hist", inside="q-0")[0]
    rects = [e for e in tree.elements if e["tag"] == "rect" and svg in e["parents"]]
    counts = [int(text(r).rsplit(": ", 1)[1]) for r in rects]
    heights = np.array([float(r["attrs"]["height"]) for r in rects])
    expected = np.log10(counts) - np.log10(0.5)
    np.testing.assert_allclose(heights / heights.max(), expected / expected.max(), atol=0.02)  # coordinates are rounded to units
    labels = [text(e) for e in tree.elements if e["tag"] == "text" and svg in e["parents"]]
    assert {"1", "10"} <= set(labels) and "sequences (log)" in labels


def test_power_law_line():
    """The line's two ends satisfy rank = n (x / x_min)^(1 - α)."""
    (r1, x1), (rn, xn) = power_law_line(2.5, 3.0, 40)
    assert (r1, rn) == (1, 40) and xn == pytest.approx(3.0)
    assert 40 * (x1 / 3.0) ** (1 - 2.5) == pytest.approx(1.0)
    assert power_law_line(float("nan"), 3.0, 40) is None and power_law_line(0.9, 3.0, 40) is None


def test_analysis_sections_render_with_their_numbers(analysed: Path):
    """Rank plot with α, the top-k % shares, the layer profile with the thirds, and the spurious badge: from analysis/."""
    html = write_report(analysed).read_text()
    tree = parse(html)
    sparsity = pd.read_parquet(analysed / "analysis/sparsity.parquet").set_index("query_index")
    thirds = pd.read_parquet(analysed / "analysis/thirds.parquet").set_index("query_index")
    shares = pd.read_parquet(analysed / "analysis/layers.parquet")
    spurious = pd.read_parquet(analysed / "analysis/spurious.parquet")
    for qi in range(len(QUERIES)):
        s = sparsity.loc[qi]
        (rank,) = tree.find("svg", "rank", inside=f"q-{qi}")
        assert f"power law α = {s.alpha:.2f}" in [text(e) for e in tree.elements if e["tag"] == "text" and rank in e["parents"]]
        section = text(tree.by_id(f"q-{qi}"))
        assert " · ".join(percent(s[k]) for k in ("share_top_0_1pct", "share_top_1pct", "share_top_10pct")) in section
        (layers,) = tree.find("svg", "layers", inside=f"q-{qi}")
        titles = [text(e) for e in tree.elements if e["tag"] == "rect" and layers in e["parents"] and e["attrs"].get("height")]
        mine = shares[shares.query_index == qi]
        assert sorted(t.rsplit(": ", 1)[1] for t in titles if "block" in t) == sorted(percent(v) for v in mine.share)
        assert f"lower {percent(thirds.loc[qi].share_lower)}" in section
        index_row = [text(e) for e in tree.find("td", inside="index")]
        assert percent(s.share_top_1pct) in index_row
    badges = tree.find("span", "spurious")
    flagged = spurious[spurious.spurious]
    assert len(flagged) == 1 and len(badges) == 1
    row = flagged.iloc[0]
    card = badges[0]["parents"][-2]
    assert card["attrs"]["id"] == f"q{row.query_index}-p{row['rank']}" and f"= {row.l2_l1:.2f}" in text(badges[0])


def test_without_analysis_tables_a_note_names_the_command(run: Path):
    tree = parse(write_report(run).read_text())
    assert not tree.find("svg", "rank") and not tree.find("span", "spurious")
    assert all("lminfluence analyze" in text(tree.by_id(f"q-{qi}")) for qi in range(len(QUERIES)))


def test_analysis_table_without_its_columns_is_named(analysed: Path):
    path = analysed / "analysis/sparsity.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["alpha"]), path)
    with pytest.raises(ValueError, match="sparsity.parquet lacks column.*alpha.*lminfluence analyze"):
        write_report(analysed)


def test_side_by_side_aligns_the_shared_sequences(analysed: Path):
    """Group "capital": one row per sequence in either top list, ranks and scores of both queries and their differences.

    A sequence outside a query's shown list gets its rank among that query's scan
    scores (1 + the number of higher ones) and its scan score, from matrix.parquet.
    """
    t = tables(analysed)
    html = write_report(analysed).read_text()
    tree = parse(html)
    (group,) = tree.find("div", "group")
    table = next(e for e in tree.find("table", "compare") if group in e["parents"])
    rows = [e for e in tree.elements if e["tag"] == "tr" and table in e["parents"] and e["parents"][-1]["tag"] == "tbody"]
    a, b = 0, 2  # the en and fr queries of the group
    top = t["top"][t["top"]["rank"] > 0]
    shown = {q: top[top.query_index == q].set_index("seq_index") for q in (a, b)}
    matrix = t["matrix"]
    seqs = list(shown[a].index) + [s for s in shown[b].index if s not in shown[a].index]
    assert len(rows) == len(seqs)
    fmt_rows = []
    for row, seq in zip(rows, seqs):
        cells = [text(c) for c in tree.elements if c["tag"] == "td" and c["parents"][-1] is row]
        expect = []
        for q in (a, b):
            if seq in shown[q].index:
                expect.append((int(shown[q].loc[seq, "rank"]), shown[q].loc[seq, "score"]))
            else:
                scan = matrix[matrix.query_index == q].set_index("seq_index").score
                expect.append((int((scan > scan[seq]).sum()) + 1, float(scan[seq])))
        assert [int(cells[1].replace(",", "")), int(cells[3].replace(",", ""))] == [e[0] for e in expect]
        assert float(cells[2]) == pytest.approx(expect[0][1], abs=0.01) and float(cells[4]) == pytest.approx(expect[1][1], abs=0.01)
        assert int(cells[5]) == expect[1][0] - expect[0][0]
        assert float(cells[6]) == pytest.approx(expect[1][1] - expect[0][1], abs=0.01)
        assert ("shared" in row["classes"]) == (seq in shown[a].index and seq in shown[b].index)
        fmt_rows.append(cells)
    assert any("shared" in r["classes"] for r in rows) and any("shared" not in r["classes"] for r in rows)
    cross = pd.read_parquet(analysed / "analysis/crosslingual.parquet")
    body = text(group)
    for r in cross.itertuples():
        assert f"{r.language_from} → {r.language_to}{percent(r.captured)}{percent(r.overlap)}{r.spearman:.2f}" in body


def test_scan_positions_match_a_brute_force_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Ranks from the batched two-pass read equal 1 + the count of higher scores, across batch boundaries."""
    import pyarrow as pa

    rng = np.random.default_rng(1)
    q = np.repeat(np.arange(3), 50)
    s = np.tile(np.arange(50), 3)
    v = rng.normal(size=150).astype(np.float32)
    pq.write_table(pa.table({"query_index": q, "seq_index": s, "score": v}), tmp_path / "m.parquet")
    monkeypatch.setattr(report_load, "BATCH_ROWS", 7)
    got = report_load.scan_positions(tmp_path / "m.parquet", {0: {3, 10}, 2: {0, 49}})
    for (qi, si), (rank, score) in got.items():
        mine = v[q == qi]
        assert score == pytest.approx(mine[si]) and rank == 1 + int((mine > mine[si]).sum())
    assert set(got) == {(0, 3), (0, 10), (2, 0), (2, 49)}


# ---- size ----


def _budget(tmp_path: Path, root: Path, budget: int, **shape) -> None:
    facts = make_budget_run(tmp_path / "run", root, **shape)
    size = write_report(tmp_path / "run").stat().st_size
    assert size <= budget, f"{size:,} bytes for {facts}"
    assert facts["chars_per_token"] > 3.5  # text as dense as a real tokenizer's, so the budget means something


def test_demo_sized_report_fits_3_mb(tmp_path: Path, report_root: Path):
    """52 queries × (10 + 10) sequences × 128 tokens from a 400-sequence corpus (the demo's shape): ≤ 3 MB."""
    _budget(tmp_path, report_root, DEMO_BUDGET, queries=52, per_side=10, tokens=128, sequences=400)


@pytest.mark.slow
def test_512_token_report_fits_15_mb(tmp_path: Path, report_root: Path):
    """200 queries × (10 + 10) distinct sequences × 512 tokens, none shown twice (the worst case): ≤ 15 MB."""
    _budget(tmp_path, report_root, LARGE_BUDGET, queries=200, per_side=10, tokens=512, sequences=4000)
