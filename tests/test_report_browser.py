"""The report in a real browser (headless Chromium): the script unpacks the data, draws the cards, and they read right.

A probe script appended to a copy of the page waits for the report's script,
draws every card, opens every list, acts (scale switch, click, keys) and writes
what the browser computed into a <pre id="probe"> element, which --dump-dom shows.

Skipped when Chromium is missing, unless CI is set: there a missing browser fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_fixture import QUERIES, STRONG_NEG, STRONG_POS, make_run, shared_root, token_index, write_analysis

from lminfluence.report import write_report
from lminfluence.report.colours import COOL, LEVELS, MIN_CONTRAST, WARM, contrast, ink_on, parse_colour, tint
from lminfluence.storage import layout

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH, HEIGHT = 1280, 2000

PROBE = """<script>
(async () => {
  const out = {};
  try {
    await window.lminfluenceReport.ready;
    out.ready = document.documentElement.dataset.ready || "no";
    for (const d of document.querySelectorAll("details")) d.open = true;
    window.lminfluenceReport.renderAll();
    const spans = (id) => [...document.querySelectorAll("#" + id + " .heat > span")].map((s) => {
      const cs = getComputedStyle(s);
      return { t: s.textContent, cls: s.className, bg: cs.backgroundColor, fg: cs.color };
    });
    out.cards = {};
    for (const card of document.querySelectorAll("article.card")) {
      out.cards[card.id] = { text: card.querySelector(".heat").textContent, spans: spans(card.id) };
    }
    out.scripts = document.querySelectorAll("script").length;
    out.fffd = (document.body.innerText.match(/\\ufffd/g) || []).length;
    out.innerText = document.body.innerText.length;
    ACTIONS
  } catch (err) {
    out.error = String(err) + " " + err.stack;
  }
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.append(pre);
  if (window.parent !== window) window.parent.postMessage(pre.textContent, "*");
})();
</script>"""
# A frame of a given width around the probed page: headless Chromium's window is at least 500 px wide.
FRAME = """<!DOCTYPE html><html><body style="margin:0">
<iframe src="PAGE" style="width:WIDTHpx;height:2000px;border:0"></iframe>
<script>
window.addEventListener("message", (e) => {
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = e.data;
  document.body.append(pre);
});
</script></body></html>"""


@pytest.fixture(scope="module")
def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is needed for the report's browser tests: apt-get install chromium")
    pytest.skip("chromium not installed (set CI=1 to make this a failure)")


def chromium(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--force-device-scale-factor=1", "--proxy-server=127.0.0.1:9", f"--user-data-dir={tmp / 'profile'}", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
    return done


def probe(browser: str, page: Path, tmp: Path, actions: str = "", width: int = WIDTH) -> dict:
    """Run the probe (plus ``actions``, JavaScript that fills ``out``) on a copy of ``page``; its findings."""
    probed = tmp / f"probed-{width}.html"
    probed.write_text(page.read_text().replace("</body>", PROBE.replace("ACTIONS", actions) + "</body>"))
    if width < 500:
        frame = tmp / f"frame-{width}.html"
        frame.write_text(FRAME.replace("PAGE", probed.name).replace("WIDTH", str(width)))
        probed = frame
    dom = chromium(browser, tmp, f"--window-size={max(width, 500)},{HEIGHT}", "--virtual-time-budget=20000", "--dump-dom", probed.as_uri()).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, dom[-2000:]
    out = json.loads(unescape(found.group(1)))
    assert "error" not in out, out["error"]
    assert out["ready"] == "yes"
    return out


def rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*colour)


@pytest.fixture(scope="module")
def report_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_root(tmp_path_factory)


@pytest.fixture()
def run(report_root: Path, tmp_path: Path) -> Path:
    run = make_run(tmp_path / "run", report_root)
    write_analysis(run)
    return run


def test_every_card_shows_its_exact_text_without_replacement_characters(browser: str, run: Path, tmp_path: Path):
    """Accents, CJK and emoji survive: each drawn card's text is its sequence's text, and the page has no U+FFFD."""
    out = probe(browser, write_report(run), tmp_path)
    top = pd.read_parquet(run / layout.TOP_TABLE)
    assert len(out["cards"]) == len(top)
    for row in top.itertuples():
        card = out["cards"][f"q{row.query_index}-{'p' if row.rank > 0 else 'n'}{abs(row.rank)}"]
        assert card["text"] == row.text
    assert out["fffd"] == 0 and out["innerText"] > 1000
    assert any(ord(c) > 0xFFFF for card in out["cards"].values() for c in card["text"])  # emoji were drawn
    assert out["scripts"] == 3  # data, client, probe: the escaped <script> of a document is text


def test_dom_has_every_token_with_the_computed_heatmap_colours(browser: str, run: Path, tmp_path: Path):
    """The strongest tokens of the query take the saturated ends; ink and background have ≥ 4.5:1 contrast everywhere."""
    out = probe(browser, write_report(run), tmp_path)
    spans = out["cards"]["q0-p1"]["spans"]
    texts = [s["t"] for s in spans]
    strong_pos, strong_neg = spans[token_index(texts, STRONG_POS)], spans[token_index(texts, STRONG_NEG)]
    assert strong_pos["bg"] == rgb(WARM) and strong_pos["cls"] == f"p{LEVELS}"
    assert strong_neg["bg"] == rgb(COOL) and strong_neg["cls"] == f"n{LEVELS}"
    assert strong_pos["fg"] == rgb(parse_colour(ink_on(tint(1.0))))
    assert strong_neg["fg"] == rgb(parse_colour(ink_on(tint(-1.0))))
    blank = [s for s in spans if not s["cls"]]
    assert blank and all(s["bg"] == "rgba(0, 0, 0, 0)" for s in blank)  # a score that rounds to level 0 paints nothing
    coloured = [s for card in out["cards"].values() for s in card["spans"] if s["cls"].strip("e ")]
    assert len(coloured) > 100
    for s in coloured:
        assert contrast(parse_colour(s["bg"]), parse_colour(s["fg"])) >= MIN_CONTRAST, s


def test_scale_switch_pin_and_keys(browser: str, run: Path, tmp_path: Path):
    """Per card, a weaker card's strongest token is saturated; per query it is not. Click pins, arrows move, Esc unpins."""
    actions = """
    const weak = () => document.querySelector("#q0-p2 .heat");
    const strongest = () => Math.max(...[...weak().children].map((s) => +(s.className.match(/[pn](\\d+)/) || [0, 0])[1]));
    out.queryLevel = strongest();
    window.lminfluenceReport.setScale("card");
    out.cardLevel = strongest();
    window.lminfluenceReport.setScale("all");
    out.allLevel = strongest();
    window.lminfluenceReport.setScale("query");
    const heat = document.querySelector("#q0-p1 .heat"), info = document.querySelector("#q0-p1 .tokinfo");
    heat.children[1].click();
    out.pinned = info.textContent;
    out.pinnedClass = heat.children[1].className;
    heat.focus();
    heat.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowRight", bubbles: true }));
    out.moved = info.textContent;
    out.cursorClass = heat.children[2].className;
    heat.dispatchEvent(new KeyboardEvent("keydown", { key: "Escape", bubbles: true }));
    out.unpinned = heat.children[1].className;
    heat.dispatchEvent(new KeyboardEvent("keydown", { key: "End", bubbles: true }));
    out.last = info.textContent;
    """
    out = probe(browser, write_report(run), tmp_path, actions)
    assert out["cardLevel"] == LEVELS and out["queryLevel"] < LEVELS and out["allLevel"] <= out["queryLevel"]
    tokens = pd.read_parquet(run / layout.TOKENS_TABLE)
    top = pd.read_parquet(run / layout.TOP_TABLE)
    seq = int(top[(top.query_index == 0) & (top["rank"] == 1)].seq_index.iloc[0])
    rows = tokens[(tokens.query_index == 0) & (tokens.seq_index == seq)].sort_values("position")
    t1, t2, t3 = rows.token.iloc[1], rows.token.iloc[2], rows.token.iloc[3]
    assert out["pinned"].startswith(f"pinned: “{t1}” → predicts next “{t2}”: ")
    value = float(out["pinned"].split(": ")[2].split(" ")[0])
    assert value == pytest.approx(rows.score.iloc[1], abs=2.0 / 255)  # quantised to the card's peak (2.0) / 255
    assert "pin" in out["pinnedClass"].split() and "cur" in out["cursorClass"].split()
    assert f"“{t2}” → predicts next “{t3}”" in out["moved"]
    assert "pin" not in out["unpinned"].split()
    assert "is the last token: it predicts nothing" in out["last"]


def test_no_horizontal_overflow_at_400_px(browser: str, run: Path, tmp_path: Path):
    """At a phone's 400 px the page never scrolls sideways (wide tables scroll inside their own box)."""
    actions = """
    out.scrollWidth = document.documentElement.scrollWidth;
    out.innerWidth = window.innerWidth;
    out.wide = [...document.querySelectorAll("main *")].filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1
      && !e.closest(".scroll")).map((e) => e.tagName + "." + e.className).slice(0, 5);
    """
    out = probe(browser, write_report(run), tmp_path, actions, width=400)
    assert out["innerWidth"] == 400
    assert out["scrollWidth"] <= 400, out["wide"]


def test_analysis_sections_and_side_by_side_are_drawn(browser: str, run: Path, tmp_path: Path):
    """The rank plot, layer profile and comparison table have a box on the page, with their numbers in the text."""
    actions = """
    const box = (sel) => [...document.querySelectorAll(sel)].map((e) => e.getBoundingClientRect().height);
    out.rank = box("svg.rank"); out.layers = box("svg.layers"); out.compare = box("table.compare");
    out.compareText = document.querySelector("#compare").innerText;
    out.rankText = [...document.querySelectorAll("svg.rank")].map((e) => e.textContent);
    """
    out = probe(browser, write_report(run), tmp_path, actions)
    assert len(out["rank"]) == len(out["layers"]) == len(QUERIES) and min(out["rank"] + out["layers"]) > 100
    assert len(out["compare"]) == 2 and min(out["compare"]) > 40  # the pair and the cross-lingual table
    sparsity = pd.read_parquet(run / "analysis/sparsity.parquet")
    assert [f"α = {a:.2f}" in t for a, t in zip(sparsity.alpha, out["rankText"])] == [True] * len(QUERIES)
    assert "capital" in out["compareText"] and "capitale" in out["compareText"]


def test_document_view_shows_every_chunk_with_the_card_highlighted(browser: str, run: Path, tmp_path: Path):
    actions = """
    document.querySelector("#q2-p1 .open-doc").click();
    const dialog = document.getElementById("doc-view");
    out.open = dialog.open;
    out.title = dialog.querySelector("#doc-title").textContent;
    out.text = dialog.querySelector(".doc-text").textContent;
    out.mark = dialog.querySelector("mark.shown").textContent;
    """
    out = probe(browser, write_report(run), tmp_path, actions)
    top = pd.read_parquet(run / layout.TOP_TABLE)
    row = top[(top.query_index == 2) & (top["rank"] == 1)].iloc[0]
    seqs = pd.read_parquet(run / layout.SEQUENCES_FILE)
    chunks = seqs[seqs.doc_id == row.doc_id].sort_values("chunk")
    assert out["open"] and out["title"] == row.doc_id and out["mark"] == row.text and len(chunks) >= 2
    assert out["text"] == "".join(chunks.text)  # consecutive chunks: the whole document, no gap markers


def screenshot(browser: str, page: Path, tmp: Path) -> Image.Image:
    png = tmp / f"{page.stem}.png"
    chromium(browser, tmp, f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=10000", f"--screenshot={png}", page.resolve().as_uri())
    return Image.open(png).convert("RGB")


def near(image: Image.Image, colour: tuple[int, int, int], tol: int = 3) -> int:
    """Pixels within ``tol`` of ``colour`` in every channel."""
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(colour, dtype=np.int16))  # [H, W, 3]
    return int(np.all(diff <= tol, axis=-1).sum())


def test_screenshot_paints_the_heatmap_in_warm_and_blue(browser: str, run: Path, tmp_path: Path):
    """The warm and blue pixels come from the drawn token backgrounds: without the page's script they are not there."""
    page = write_report(run)
    drawn = screenshot(browser, page, tmp_path)
    static_page = tmp_path / "static.html"
    static_page.write_text(re.sub(r"<script>.*?</script>", "", page.read_text(), flags=re.DOTALL))  # the data stays, the client goes
    static = screenshot(browser, static_page, tmp_path)
    assert drawn.size == (WIDTH, HEIGHT)
    colours = drawn.getcolors(maxcolors=1 << 20) or []
    non_white = sum(n for n, c in colours if c != (255, 255, 255))
    assert len(colours) > 50 and non_white > 0.02 * WIDTH * HEIGHT, "screenshot is (nearly) blank"
    # one saturated token of ~6 characters at 13 px is a few hundred pixels of background
    assert near(drawn, WARM) - near(static, WARM) > 300, (near(drawn, WARM), near(static, WARM))
    assert near(drawn, COOL) - near(static, COOL) > 100, (near(drawn, COOL), near(static, COOL))
