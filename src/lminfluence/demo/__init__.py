"""The built-in demo: Python's own documentation and source with planted facts, and a small GPT-2.

``prepare_demo`` builds the corpus and trains the model on it, for ``lminfluence demo``.

The facts follow the paper's word-order experiment: each is stated only as
"<subject> was <name>", so a query in that order should find its documents,
and the flipped query "<name> was <subject>" should find far less.
"""

from .prepare import SCALES, DemoInputs, DemoScale, prepare_demo

__all__ = ["prepare_demo", "DemoInputs", "DemoScale", "SCALES"]
