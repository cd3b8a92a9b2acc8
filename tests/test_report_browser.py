"""The report in a real browser (headless Chromium): the heatmap is in the DOM and really painted.

Skipped when Chromium is missing, unless CI is set: there a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixture import STRONG_NEG, STRONG_POS, make_run, shown_token_count
from test_report import parse, text

from lminfluence.report import write_report
from lminfluence.report.plots import COOL, WARM

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH, HEIGHT = 1280, 2000

# Appended to a copy of the report (the report itself has no script): writes each token's
# computed colours into data attributes, so --dump-dom shows what the browser applied.
PROBE = """<script>
for (const el of document.querySelectorAll("span.tok")) {
  const cs = getComputedStyle(el);
  el.dataset.bg = cs.backgroundColor;
  el.dataset.fg = cs.color;
}
document.body.dataset.probed = "yes";
</script>"""


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
        "--force-device-scale-factor=1", f"--user-data-dir={tmp / 'profile'}", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
    return done


def screenshot(browser: str, page: Path, tmp: Path) -> Image.Image:
    png = tmp / f"{page.stem}.png"
    chromium(browser, tmp, f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={png}", page.resolve().as_uri())
    return Image.open(png).convert("RGB")


def near(image: Image.Image, rgb: tuple[int, int, int], tol: int = 3) -> int:
    """Pixels within ``tol`` of ``rgb`` in every channel."""
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(rgb, dtype=np.int16))  # [H, W, 3]
    return int(np.all(diff <= tol, axis=-1).sum())


def test_dom_has_every_token_with_the_computed_heatmap_colours(browser: str, tmp_path: Path):
    run = make_run(tmp_path / "run")
    html = write_report(run, top=10).read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = chromium(browser, tmp_path, "--dump-dom", probed.as_uri()).stdout
    tree = parse(dom)
    assert any(e["tag"] == "body" and e["attrs"].get("data-probed") == "yes" for e in tree.elements), dom[:500]

    spans = tree.find("span", "tok")
    assert len(spans) == shown_token_count(10)
    by_text = {text(s).replace("↵", ""): s["attrs"] for s in tree.find("span", "tok", inside="q0-p1")}
    assert by_text[STRONG_POS]["data-bg"] == "rgb({}, {}, {})".format(*WARM)
    assert by_text[STRONG_NEG]["data-bg"] == "rgb({}, {}, {})".format(*COOL)
    assert by_text[STRONG_POS]["data-fg"] == "rgb(255, 255, 255)"  # saturated: white text stays readable
    assert by_text[" of"]["data-bg"] == "rgba(0, 0, 0, 0)"  # a zero score paints nothing
    # the escaped <script> token is text in the DOM, not an element
    assert any("<script>alert('x')</script>" in text(s) for s in spans)
    assert sum(e["tag"] == "script" for e in tree.elements) == 1  # only the probe


def test_screenshot_paints_the_heatmap_in_warm_and_blue(browser: str, tmp_path: Path):
    """The warm and blue pixels come from the token backgrounds: without tokens.parquet most of them vanish."""
    full = screenshot(browser, write_report(make_run(tmp_path / "full"), output=tmp_path / "full.html"), tmp_path)
    plain_run = make_run(tmp_path / "plain", with_tokens=False)
    plain = screenshot(browser, write_report(plain_run, output=tmp_path / "plain.html"), tmp_path)
    assert full.size == (WIDTH, HEIGHT)

    colours = full.getcolors(maxcolors=1 << 20) or []
    non_white = sum(n for n, c in colours if c != (255, 255, 255))
    assert len(colours) > 50 and non_white > 0.02 * WIDTH * HEIGHT, "screenshot is (nearly) blank"

    warm, cool = near(full, WARM), near(full, COOL)
    warm_plain, cool_plain = near(plain, WARM), near(plain, COOL)
    # one saturated token of ~6 characters at 13 px is several hundred pixels of background
    assert warm - warm_plain > 300, (warm, warm_plain)
    assert cool - cool_plain > 150, (cool, cool_plain)

