"""Category 6, the Python API: bad arguments must raise a ValueError or TypeError (the review's bar), not run on.

The review accepted any ValueError/TypeError (InputError is a ValueError) wherever it was
raised; a case that allows an empty or finite result instead says so. The fixtures: model A
and model B, six training sequences of the corpus, two of the queries, EK-FAC factors.
"""

from __future__ import annotations

import copy
import json
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cases import Case, Ctx
from harness import Result, truncate

VALUE_OR_TYPE = (ValueError, TypeError)


class Fixtures:
    def __init__(self, ctx: Ctx) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import lminfluence as li

        self.li = li
        self.model = AutoModelForCausalLM.from_pretrained(ctx.p["A"]).eval()
        self.model_b = AutoModelForCausalLM.from_pretrained(ctx.p["B"]).eval()
        self.tok = AutoTokenizer.from_pretrained(ctx.p["A"])
        texts = [line for line in ctx.p["corpus"].read_text(encoding="utf-8").splitlines() if line.strip()][:6]
        self.train = [{"input_ids": self.tok(json.loads(t)["text"])["input_ids"][:48]} for t in texts]
        rows = [json.loads(line) for line in (ctx.p["in"] / "q.jsonl").read_text(encoding="utf-8").splitlines()][:2]
        self.queries = li.examples_from_pairs(self.tok, [(r["prompt"], r["completion"]) for r in rows])
        self.factors = li.fit_factors(self.model, self.train)
        self.factors_b = li.fit_factors(self.model_b, self.train)

    def changed(self, name_part: str):
        """A copy of model A with one weight moved by 1e-3 (the factors were fitted on the original)."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if name_part in n)].add_(1e-3)
        return model

    def truncated_factors(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="lminfluence-api-")) / "factors"
        self.factors.save(path)
        truncate(path / "factors.safetensors")
        return path


def _where(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(e).__name__}{at}: {' '.join(str(e).split())[:300]}"


def api_case(
    case_id: int,
    name: str,
    call: Callable[[Fixtures], Any],
    *,
    expected: str = "a ValueError/TypeError naming the argument",
    allowed: tuple[type[BaseException], ...] = VALUE_OR_TYPE,
    mentions: tuple[str, ...] = (),
    accept: Callable[[Any], bool] | None = None,
    adapted: str = "",
) -> Case:
    """``call`` must raise one of ``allowed`` (with ``mentions`` in its message), or return something ``accept`` takes."""

    def run(ctx: Ctx, result: Result) -> None:
        if "api" not in ctx.cache:
            ctx.cache["api"] = Fixtures(ctx)
        fx = ctx.cache["api"]
        try:
            value = call(fx)
        except Exception as e:  # noqa: BLE001 - the exception's type is what is judged
            text = str(e).lower()
            ok = isinstance(e, allowed) and all(m.lower() in text for m in mentions)
            result.observed = _where(e)
        else:
            ok = accept is not None and accept(value)
            result.observed = f"no error; returned {type(value).__name__}: {' '.join(repr(value).split())[:200]}"
        result.verdict = "PASS" if ok else "FAIL"
        result.command = name

    return Case(case_id, "6 python API", name, expected, run, adapted)


def _finite_empty(value: Any) -> bool:
    total = getattr(value, "total", None)
    return total is not None and (total.numel() == 0 or bool(total.isfinite().all()))


def _nolinear():
    from torch import nn

    class NoLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 4)

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return type("Out", (), {"logits": self.emb(input_ids) @ torch.ones(4, 16)})()

    return NoLinear()


def cases() -> list[Case]:
    def fc(**kw):
        return lambda fx: fx.li.FactorConfig(**kw)

    def sc(**kw):
        return lambda fx: fx.li.ScoreConfig(**kw)

    nan = float("nan")
    return [
        api_case(163, "FactorConfig(strategy=1)", fc(strategy=1)),
        api_case(164, "FactorConfig(strategy='EKFAC')", fc(strategy="EKFAC")),
        api_case(165, "FactorConfig(modules=5)", fc(modules=5)),
        api_case(166, "FactorConfig(modules=[])", fc(modules=[])),
        api_case(167, "FactorConfig(seed='x')", fc(seed="x")),
        api_case(168, "FactorConfig(seed=1.5)", fc(seed=1.5)),
        api_case(169, "FactorConfig(lissa_depth=0)", fc(lissa_depth=0)),
        api_case(170, "FactorConfig(lissa_scale=float('nan'))", fc(lissa_scale=nan)),
        api_case(171, "FactorConfig(fisher='true')", fc(fisher="true")),
        api_case(172, "ScoreConfig(damping_scale='x')", sc(damping_scale="x")),
        api_case(173, "ScoreConfig(damping_scale=-1)", sc(damping_scale=-1)),
        api_case(174, "ScoreConfig(damping_scale=nan)", sc(damping_scale=nan)),
        api_case(175, "ScoreConfig(damping=-1)", sc(damping=-1)),
        api_case(176, "ScoreConfig(damping='1e-3')", sc(damping="1e-3")),
        api_case(177, "ScoreConfig(query_rank=0)", sc(query_rank=0)),
        api_case(178, "ScoreConfig(query_rank=2.5)", sc(query_rank=2.5)),
        api_case(179, "Execution(batch_size=0) (was ScoreConfig(train_batch_size=0))", lambda fx: fx.li.Execution(batch_size=0),
                 adapted="the scoring batch size moved from ScoreConfig.train_batch_size to Execution.batch_size"),
        api_case(180, "ScoreConfig(per_token=True, algorithm='materialize')", sc(per_token=True, algorithm="materialize")),
        api_case(181, "ScoreConfig(per_layer='yes')", sc(per_layer="yes"), expected="TypeError/ValueError (a non-bool flag)"),
        api_case(182, "ScoreConfig(damping_scale=None, damping=None)", sc(damping_scale=None, damping=None)),
        api_case(183, "fit_factors(model, train, config={'strategy':'ekfac'}) (dict, not FactorConfig)", lambda fx: fx.li.fit_factors(fx.model, fx.train, {"strategy": "ekfac"})),
        api_case(184, "fit_factors(model, train, execution=Execution(batch_size=0)) (was batch_size=0)",
                 lambda fx: fx.li.fit_factors(fx.model, fx.train, execution=fx.li.Execution(batch_size=0)),
                 adapted="fit_factors takes its batch size in an Execution now"),
        api_case(185, "fit_factors(model, [], ...) (empty train)", lambda fx: fx.li.fit_factors(fx.model, [])),
        api_case(186, "fit_factors on a model with no Linear/Conv1D layers", lambda fx: fx.li.fit_factors(_nolinear(), [{"input_ids": [1, 2, 3]}])),
        api_case(187, "fit_factors(modules=['no.such.layer']) on GPT-2", lambda fx: fx.li.fit_factors(fx.model, fx.train, fx.li.FactorConfig(modules=("no.such.layer",)))),
        api_case(188, "compute_scores with queries whose labels are all -100", lambda fx: fx.li.compute_scores(fx.model, fx.factors, [{"input_ids": [5, 6, 7], "labels": [-100] * 3}], fx.train),
                 expected="ValueError: the query has no labelled token (not silent zeros/NaN)"),
        api_case(189, "compute_scores with factors fitted on another model (modelB factors, modelA model)", lambda fx: fx.li.compute_scores(fx.model, fx.factors_b, fx.queries, fx.train)),
        api_case(190, "compute_scores with factors fitted before the model's MLP weights changed",
                 lambda fx: fx.li.compute_scores(fx.changed("h.0.mlp.c_fc.weight"), fx.factors, fx.queries, fx.train)),
        api_case(191, "compute_scores with factors fitted before the model's embeddings changed", lambda fx: fx.li.compute_scores(fx.changed("wte"), fx.factors, fx.queries, fx.train),
                 expected="ValueError (model changed since the fit)"),
        api_case(192, "compute_scores with token ids ≥ vocab", lambda fx: fx.li.compute_scores(fx.model, fx.factors, [{"input_ids": [1, 2, 600], "labels": [-100, 2, 600]}], fx.train)),
        api_case(193, "compute_scores with queries=[]", lambda fx: fx.li.compute_scores(fx.model, fx.factors, [], fx.train),
                 expected="ValueError (no queries) or an empty [0, N] result", accept=_finite_empty),
        api_case(194, "compute_scores with train=[]", lambda fx: fx.li.compute_scores(fx.model, fx.factors, fx.queries, []),
                 expected="ValueError (no training data) or an empty [Q, 0] result", accept=_finite_empty),
        api_case(195, "compute_scores with a 1-token training sequence", lambda fx: fx.li.compute_scores(fx.model, fx.factors, fx.queries, [{"input_ids": [5]}]),
                 expected="ValueError, or a finite score of 0", accept=lambda v: bool((v.total == 0).all())),
        api_case(196, "compute_scores(config=dict)", lambda fx: fx.li.compute_scores(fx.model, fx.factors, fx.queries, fx.train, {"damping_scale": 0.1})),
        api_case(197, "compute_scores with train given as a list of str", lambda fx: fx.li.compute_scores(fx.model, fx.factors, fx.queries, ["some text", "more"])),
        api_case(198, "compute_scores with input_ids as float tensor", lambda fx: fx.li.compute_scores(fx.model, fx.factors, fx.queries, [{"input_ids": torch.tensor([1.0, 2.0, 3.0])}]),
                 expected="TypeError/ValueError, or (if cast) a finite result", accept=_finite_empty),
        api_case(199, "load_factors on a missing dir", lambda fx: fx.li.load_factors(Path(tempfile.mkdtemp()) / "missing"), allowed=(*VALUE_OR_TYPE, OSError),
                 expected="a ValueError/TypeError (or FileNotFoundError) naming the path"),
        api_case(200, "load_factors on a truncated factors.safetensors", lambda fx: fx.li.load_factors(fx.truncated_factors()), allowed=(ValueError, OSError),
                 mentions=("factors",), expected="ValueError/OSError naming the file"),
        api_case(201, "examples_from_pairs with a None completion", lambda fx: fx.li.examples_from_pairs(fx.tok, [("The poet", None)])),
        api_case(202, "examples_from_pairs with an int prompt", lambda fx: fx.li.examples_from_pairs(fx.tok, [(5, " x")])),
        api_case(203, "examples_from_pairs with an empty prompt", lambda fx: fx.li.examples_from_pairs(fx.tok, [("", " x")])),
        api_case(204, "Scores.top_k(10) with N=3", lambda fx: fx.li.Scores(torch.tensor([[1.0, 3.0, 2.0]])).top_k(10),
                 expected="ValueError, or the 3 available", accept=lambda v: tuple(v[0].shape) == (1, 3) and v[1][0].tolist() == [1, 2, 0]),
        api_case(205, "Scores.top_k(-1)", lambda fx: fx.li.Scores(torch.zeros(1, 3)).top_k(-1)),
    ]


__all__ = ["cases", "Fixtures"]
