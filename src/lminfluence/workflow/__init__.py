"""Orchestration of the command-line stages over a run directory: fit, score (tables), with resume."""

from .config import CorpusSection, FitSection, ModelSection, RunConfig, ScoreSection
from .fitting import run_fit
from .scoring import run_score

__all__ = ["RunConfig", "ModelSection", "CorpusSection", "FitSection", "ScoreSection", "run_fit", "run_score"]
