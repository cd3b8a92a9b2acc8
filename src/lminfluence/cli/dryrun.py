"""``--dry-run``: the memory and time each stage of a command will need, and the batch sizes picked, before any heavy work.

The model is loaded, the corpus and queries are read and tokenized (so their
errors surface as they would in a real run), and ``lminfluence.memory`` plans
the stages; nothing is written to the run directory.
"""

from __future__ import annotations

from typing import Any

from ..memory import plan_for_data
from ..workflow.config import RunConfig


def dry_run(config: RunConfig, command: str, overwrite: bool) -> str:
    """The printable plan of ``command`` ("fit", "score" or "run") for ``config``."""
    from ..task.causal_lm import CausalLMTask
    from ..workflow.fitting import _tokenize, prepare_fit
    from ..workflow.scoring import prepare_queries, prepare_score

    task = CausalLMTask()
    lines = []
    if command == "score":
        score = prepare_score(config, overwrite=overwrite)
        section = _score_section(config)
        plan = plan_for_data(
            score.model, score.factors.config, section.execution, score.store, queries=score.queries.examples,
            score_config=section.scoring, task=task, factors=score.factors, stages=("precondition", "score"),
        )
        lines.append(f"score: {len(score.queries.examples)} queries against {len(score.store)} sequences")
        lines.append(plan.report())
        return "\n".join(lines)
    fit = prepare_fit(config, overwrite=overwrite)
    store = fit.store if fit.store is not None else _tokenize(config, fit.tokenizer)[0]
    queries = prepare_queries(config, fit.tokenizer, fit.model).examples if command == "run" else None  # their errors come first
    plan = plan_for_data(fit.model, config.fit.factors, config.fit.execution, store, task=task, stages=("fit",))
    lines.append(f"fit: {len(store)} sequences on {len(fit.modules)} tracked layers" + (" (a finished fit would be reused)" if fit.reuse else ""))
    lines.append(plan.report())
    if command == "run":  # scoring with the score section's own execution settings
        section = _score_section(config)
        plan = plan_for_data(
            fit.model, config.fit.factors, section.execution, store, queries=queries, score_config=section.scoring, task=task,
            stages=("precondition", "score"),
        )
        lines.append(f"score: {len(queries or [])} queries against {len(store)} sequences")
        lines.append(plan.report())
    return "\n".join(lines)


def _score_section(config: RunConfig) -> Any:
    if config.score is None:
        from ..errors import InputError

        raise InputError("no score settings: give --queries")
    return config.score


__all__ = ["dry_run"]
