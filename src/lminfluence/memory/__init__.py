"""Memory and time a fit or a scoring run will need, before it runs, and batch sizes that fit a budget.

``plan`` adds up, per stage, what is held at its peak:

- what the process holds now (the model, the interpreter, anything loaded);
- the activations of one batch: measured, not guessed, by running the
  library's own pass on one sequence of the planned length (``probe``) and
  counting the bytes of the tensors it creates (CUDA: the allocator's peak;
  CPU: ``TensorMemoryTracker``), times the batch size;
- the captures kept for EK-FAC's second pass (``Execution.cache_gib``);
- the curvature's state, from the tracked layers' shapes: float64 running
  sums of A and S (packed triangles), the eigendecomposition's workspace,
  the eigenbases and eigenvalues in their storage dtype, the float64 sums of Λ;
- for scoring: the preconditioned query gradients (dense, or rank-R factors),
  the per-sequence gradients materialised per batch, the factors when held.

Batch sizes left at None in ``Execution`` are the largest whose peak fits the
budget, up to a number of tokens per batch beyond which batches are no faster
per token (``TOKENS_PER_BATCH``; on a CPU also ``WORK_PER_BATCH``, the work that makes
per-batch fixed costs negligible) and to activations of at most ``BATCH_SHARE``
of the budget (larger batches buy no speed and would crowd out the query
gradients). EK-FAC's capture cache, a speed-up only, is kept when it takes at
most ``CACHE_SHARE`` of the budget. The budget is ``Execution.memory_gib`` or
what the device has: free CUDA memory, or the machine's available RAM, plus
what the process already holds. Times are rough estimates from the probe's
time and measured matrix-product and eigendecomposition speeds.

Usage::

    p = lminfluence.memory.plan(model, FactorConfig(), Execution(), num_sequences=10_000, seq_len=512, num_queries=16)
    print(p.report())
    p.fit_batch_size, p.score_batch_size, p.query_batch_size
"""

from .measure import Probe, TensorMemoryTracker, available_bytes, probe, process_bytes, synthetic_example
from .plan import (
    BATCH_SHARE,
    CACHE_SHARE,
    TOKENS_PER_BATCH,
    WORK_PER_BATCH,
    Plan,
    Stage,
    headroom,
    memory_budget,
    plan,
    plan_for_data,
)

__all__ = [
    "plan",
    "plan_for_data",
    "Plan",
    "Stage",
    "memory_budget",
    "headroom",
    "Probe",
    "probe",
    "TensorMemoryTracker",
    "process_bytes",
    "available_bytes",
    "synthetic_example",
    "TOKENS_PER_BATCH",
    "WORK_PER_BATCH",
    "BATCH_SHARE",
    "CACHE_SHARE",
]
