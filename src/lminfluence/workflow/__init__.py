"""The command-line stages over a run directory: fit, score (tables), with resume and staged outputs."""

from .config import (
    CorpusSection,
    FitSection,
    ModelSection,
    RunConfig,
    ScoreFiles,
    ScoreSection,
)
from .fitting import prepare_fit, run_fit
from .scoring import prepare_score, run_score

__all__ = ["RunConfig", "ModelSection", "CorpusSection", "FitSection", "ScoreSection", "ScoreFiles", "run_fit", "run_score", "prepare_fit", "prepare_score"]
