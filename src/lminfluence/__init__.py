"""lminfluence: which training sequences made this language model say that?

Influence functions with EK-FAC (Grosse et al. 2023) for Hugging Face causal LMs.
A score is the first-order change of log p(completion | prompt) per unit
up-weighting of a training sequence in the mean training objective:
positive means the sequence makes the completion more likely.
"""

from .config import Execution, FactorConfig, ScoreConfig
from .curvature.factors import Factors, load_factors
from .curvature.fit import fit_factors
from .scoring.pairwise import Scores, compute_scores, compute_self_scores
from .task.base import Task
from .task.causal_lm import CausalLMTask, examples_from_pairs

__version__ = "0.1.0"

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
