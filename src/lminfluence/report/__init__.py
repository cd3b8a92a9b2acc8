"""The HTML report of a run directory (`lminfluence report`).

One self-contained page: inline CSS, SVG and script, the card data compressed in
the page, nothing fetched.
"""

from .load import load_run
from .page import render, write_report

__all__ = ["load_run", "render", "write_report"]
