"""The paper's analyses of influence scores (docs/method.md §7).

Pure functions on score arrays (``fit_power_law``, ``top_share``,
``layer_thirds``, ``crosslingual_rows``, ...) and ``analyze_run``, which
computes all of them for a scored run directory and writes the tables under
RUN/analysis/ (docs/run-directory.md, docs/analyses.md).
"""

from .compare import compare_runs
from .crosslingual import crosslingual_rows
from .layers import layer_shares, layer_thirds, third_rank_agreement
from .run import Analysis, analyze_run, table_path
from .sparsity import PowerLawFit, fit_power_law, rank_curve, top_share
from .tokens import is_spurious, l2_l1_ratio
from .word_order import (
    StatementPair,
    read_pairs,
    score_word_order,
    summarize_word_order,
)

__all__ = [
    "analyze_run",
    "Analysis",
    "table_path",
    "fit_power_law",
    "PowerLawFit",
    "top_share",
    "rank_curve",
    "l2_l1_ratio",
    "is_spurious",
    "layer_thirds",
    "layer_shares",
    "third_rank_agreement",
    "crosslingual_rows",
    "compare_runs",
    "StatementPair",
    "read_pairs",
    "score_word_order",
    "summarize_word_order",
]
