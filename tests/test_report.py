"""The HTML report, read as text: content, card counts, escaping, self-containment, errors."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from report_fixture import (
    BLOCKS_Q0_R1,
    LAYER_BLOCKS_Q1_R1,
    PLAIN_TEXT,
    QUERIES,
    SCRIPT_TOKEN,
    SEQUENCES,
    STRONG_NEG,
    STRONG_POS,
    make_run,
)

from lminfluence.report import write_report
from lminfluence.report.cards import heatmap_html
from lminfluence.report.plots import COOL, LEVELS, WARM, fmt, hex_colour, level, mix
from lminfluence.storage import layout

VOID = {"meta", "br", "img", "input", "link", "hr", "wbr"}


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


def parse(html: str) -> Tree:
    tree = Tree()
    tree.feed(html)
    return tree


def text(el: dict) -> str:
    return "".join(el["text"])


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def count(query: int, positive: bool) -> int:
    return sum((rank > 0) == positive for rank, *_ in SEQUENCES[query])


@pytest.mark.parametrize("top", [1, 2, 10])
def test_every_query_has_its_section_and_min_top_rows_cards(run: Path, top: int):
    """Per query: min(top, positive rows) cards outside <details>, min(top, negative rows) inside."""
    html = write_report(run, top=top).read_text()
    tree = parse(html)
    for qi, (qid, prompt, completion) in enumerate(QUERIES):
        (section,) = [e for e in tree.find("section") if e["attrs"].get("id") == f"q-{qi}"]
        cards = tree.find("article", "card", inside=f"q-{qi}")
        negative = [c for c in cards if any(p["tag"] == "details" for p in c["parents"])]
        assert len(cards) - len(negative) == min(top, count(qi, True)), qid
        assert len(negative) == min(top, count(qi, False)), qid
        assert [c["attrs"]["id"] for c in cards if c not in negative] == [f"q{qi}-p{r}" for r in range(1, len(cards) - len(negative) + 1)]
        assert prompt in text(section) and completion in text(section)
        assert tree.find("a", inside="index") and any(a["attrs"].get("href") == f"#q-{qi}" for a in tree.find("a", inside="index"))
    assert len(tree.find("section", "query")) == len(QUERIES)


def test_default_output_is_run_report_index_and_written_atomically(run: Path, tmp_path: Path):
    out = write_report(run)
    assert out == run / layout.REPORT_FILE and out.is_file()
    assert write_report(run) == out  # overwrites in place
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]  # no temporary file left behind
    custom = write_report(run, output=tmp_path / "elsewhere" / "r.html")
    assert custom.read_text() == out.read_text()


def test_self_contained_no_external_resource_and_no_script(run: Path):
    html = write_report(run).read_text()
    for bad in ("http://", "https://", "<script", "<link", "@import", "url(", " src=", "<img", "<iframe"):
        assert bad not in html.lower(), bad
    assert "<style>" in html and "<svg" in html


def test_escaping_of_tokens_text_and_ids(run: Path):
    html = write_report(run).read_text()
    assert "alert(" in html  # the token is there, but only escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<b>this</b>" not in html and "Escape &lt;b&gt;this&lt;/b&gt; &amp; that:" in html
    assert '<span class="qid">html&lt;b&gt;</span>' in html
    tree = parse(html)
    assert not any(e["tag"] == "b" and text(e) == "this" for e in tree.elements)
    toks = tree.find("span", "tok", inside="q0-p1")
    assert SCRIPT_TOKEN in [text(t) for t in toks]


def css_background(html: str, cls: str) -> str:
    (colour,) = re.findall(r"\.tok\." + cls + r"\{background:(#[0-9a-f]{6});", html)
    return colour


def test_token_heatmap_colours_order_and_titles(run: Path):
    """Token spans in position order; the strongest positive/negative tokens take the saturated end colours."""
    html = write_report(run).read_text()
    tree = parse(html)
    rank, toks, scores, _ = SEQUENCES[0][0]
    spans = tree.find("span", "tok", inside="q0-p1")
    shown = [text(s).replace("↵", "") for s in spans]
    assert shown == toks  # the fixture writes token rows in reverse: the report sorts by position
    levels = {text(s).replace("↵", ""): s["classes"] - {"tok"} for s in spans}
    assert levels[STRONG_POS] == {f"p{LEVELS}"} and css_background(html, f"p{LEVELS}") == hex_colour(WARM)
    assert levels[STRONG_NEG] == {f"n{LEVELS}"} and css_background(html, f"n{LEVELS}") == hex_colour(COOL)
    assert levels[" of"] == set()  # score 0: no background at all
    k = round(0.6 * LEVELS)  # " is" scores 0.6 in a card whose max |score| is 1
    assert levels[" is"] == {f"p{k}"} and css_background(html, f"p{k}") == hex_colour(mix(k / LEVELS))
    assert [s["attrs"]["title"] for s in spans] == [fmt(x, signed=True) for x in scores]
    (nl,) = [s for s in spans if "\n" in text(s)]
    assert nl["attrs"]["title"] == fmt(0.1, signed=True)


def test_each_card_is_scaled_by_its_own_max(run: Path):
    """Card q0-p2's max |token score| is 0.5: that token is saturated, not half-tinted."""
    tree = parse(write_report(run).read_text())
    _, toks, scores, _ = SEQUENCES[0][1]
    spans = tree.find("span", "tok", inside="q0-p2")
    strongest = max(range(len(scores)), key=lambda i: abs(scores[i]))
    assert spans[strongest]["classes"] == {"tok", f"p{LEVELS}"}
    assert spans[1]["classes"] == {"tok", f"n{round(0.2 * LEVELS)}"}  # -0.1 / 0.5


def _block_bars(tree: Tree, card: str) -> list[tuple[str, str]]:
    (svg,) = tree.find("svg", "blocks", inside=card)
    rects = [e for e in tree.elements if e["tag"] == "rect" and svg in e["parents"]]
    return [(next(iter(r["classes"])), text(r)) for r in rects]


def test_block_bars_signs_from_block_scores_and_from_layers_table(run: Path):
    tree = parse(write_report(run).read_text())
    bars = _block_bars(tree, "q0-p1")
    assert [c for c, _ in bars] == ["pos" if v >= 0 else "neg" for v in BLOCKS_Q0_R1]
    assert [t for _, t in bars] == [f"block {i}: {fmt(v, True)}" for i, v in enumerate(BLOCKS_Q0_R1)]
    # q1's rank-1 row has null block_scores: layers.parquet's two layers per block are summed
    bars = _block_bars(tree, "q1-p1")
    assert [t for _, t in bars] == [f"block {i}: {fmt(v, True)}" for i, v in enumerate(LAYER_BLOCKS_Q1_R1)]
    assert [c for c, _ in bars] == ["pos", "neg", "pos", "pos"]


def test_sequence_without_token_rows_shows_plain_text_and_a_note(run: Path):
    tree = parse(write_report(run).read_text())
    assert not tree.find("span", "tok", inside="q2-p1")
    (plain,) = tree.find("div", "plain", inside="q2-p1")
    assert text(plain) == PLAIN_TEXT
    assert any("No per-token scores" in text(n) for n in tree.find("p", "note", inside="q2-p1"))


def test_without_tokens_table_every_card_is_plain(run: Path):
    (run / layout.TOKENS_TABLE).unlink()
    tree = parse(write_report(run).read_text())
    assert not tree.find("span", "tok")
    assert len(tree.find("div", "plain")) == len(tree.find("article", "card")) > 0


def test_header_summary_histograms_and_legend(run: Path):
    html = write_report(run).read_text()
    tree = parse(html)
    summary = {text(d["parents"][-1]).replace(text(d), "", 1): text(d) for d in tree.find("dd")}
    assert summary["model"] == "toy/tiny-gpt2"
    assert summary["strategy"] == "ekfac"
    assert summary["training sequences"] == "50"
    assert summary["query rank"] == "32"
    assert summary["time: fit"] == "12.5 s"
    assert "first-order change of log p(completion | prompt)" in html
    assert tree.find("div", "legend")
    hists = tree.find("svg", "hist")
    assert len(hists) == len(QUERIES)
    for h in hists:
        assert any(e["tag"] == "line" and "zero" in e["classes"] and h in e["parents"] for e in tree.elements)


@pytest.mark.parametrize("rel", [layout.RUN_MANIFEST, layout.QUERIES_TABLE, layout.TOP_TABLE])
def test_missing_file_names_it_and_the_command(run: Path, rel: str):
    (run / rel).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(rel) + ".*lminfluence score"):
        write_report(run)
    assert not (run / layout.REPORT_FILE).exists()


def test_missing_column_is_named(run: Path):
    table = pq.read_table(run / layout.TOP_TABLE).drop_columns(["text"])
    pq.write_table(table, run / layout.TOP_TABLE)
    with pytest.raises(ValueError, match="top.parquet lacks column.*text"):
        write_report(run)


def test_top_must_be_positive(run: Path):
    with pytest.raises(ValueError, match="top must be a positive integer"):
        write_report(run, top=0)


def test_fmt_three_significant_digits():
    assert fmt(1.23456e-5) == "1.23e-05"
    assert fmt(-0.000999) == "−9.99e-04"
    assert fmt(0.5, signed=True) == "+0.5"
    assert fmt(123.456) == "123"
    assert fmt(12345.0) == "1.23e+04"
    assert fmt(0.0) == "0" and fmt(None) == "–"


def test_colour_scale_ends():
    assert mix(1.0) == WARM and mix(-1.0) == COOL and mix(0.0) == (255, 255, 255)
    assert mix(2.0) == WARM  # clipped
    r, g, b = mix(0.5)
    assert r > g > b and (r, g, b) != WARM


def test_heatmap_levels():
    assert level(1.0) == f"p{LEVELS}" and level(-1.0) == f"n{LEVELS}"
    assert level(0.0) == "" and level(0.4 / LEVELS) == ""  # rounds to no colour
    assert level(0.5) == f"p{LEVELS // 2}" and level(-0.5) == f"n{LEVELS // 2}"


def test_non_finite_token_scores_do_not_break_the_card():
    """A NaN token (e.g. a masked position) gets no colour and a dash; the others are still scaled by the finite max."""
    tree = parse(heatmap_html(["a", "b", "c"], np.array([0.5, float("nan"), -0.25])))
    spans = tree.find("span", "tok")
    assert [s["classes"] for s in spans] == [{"tok", f"p{LEVELS}"}, {"tok"}, {"tok", f"n{LEVELS // 2}"}]
    assert spans[1]["attrs"]["title"] == "–"
