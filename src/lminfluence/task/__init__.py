"""What is measured: the causal-LM task and the protocol for custom tasks."""

from .base import Batch, Task
from .causal_lm import IGNORE_INDEX, CausalLMTask, examples_from_pairs

__all__ = ["Task", "Batch", "CausalLMTask", "examples_from_pairs", "IGNORE_INDEX"]
