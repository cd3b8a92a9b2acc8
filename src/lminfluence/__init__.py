"""lminfluence: which training sequences made this language model say that?

Influence functions with EK-FAC (Grosse et al. 2023) for Hugging Face causal LMs.
A score is the first-order change of log p(completion | prompt) per unit
up-weighting of a training sequence in the mean training objective:
positive means the sequence makes the completion more likely.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .config import Execution, FactorConfig, ScoreConfig
from .curvature.factors import Factors, load_factors
from .fitting import fit_factors
from .scoring.pairwise import Scores, compute_scores, compute_self_scores
from .task.base import Task
from .task.causal_lm import CausalLMTask, examples_from_pairs

try:  # one version number: pyproject.toml's, as installed
    __version__ = _version("lminfluence")
except PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0+unknown"

__all__ = [
    "FactorConfig",
    "ScoreConfig",
    "Execution",
    "fit_factors",
    "load_factors",
    "Factors",
    "compute_scores",
    "compute_self_scores",
    "Scores",
    "Task",
    "CausalLMTask",
    "examples_from_pairs",
]
