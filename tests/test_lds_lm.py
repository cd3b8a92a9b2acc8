"""The LDS benchmark's pieces at toy size (benchmarks/lds_lm.py, benchmarks/lds/, docs/accuracy.md).

The benchmark's numbers mean something only if its ground truth is
reproducible (seeded subsets, deterministic retraining, a resumed build equal
to an uninterrupted one) and if its method runner and LDS summary give a
correct estimator a high LDS. The last is checked on a convex language model
(a bigram model: logits = W · one_hot(previous token)), where the exact
influence is a dense solve and retraining reaches the optimum exactly.
"""

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from lds.corpus import CorpusSpec, build_corpus  # noqa: E402
from lds.methods import METHODS, Context, Method, run_method  # noqa: E402
from lds.train import ModelSpec, measure, train_on  # noqa: E402
from lds.truth import TIME_FILE, build_truth, paired, summarize, truth_diagnostics  # noqa: E402

import lminfluence as li  # noqa: E402
from lminfluence.demo.model import make_model  # noqa: E402
from lminfluence.evaluation import GroundTruth  # noqa: E402

TOY_CORPUS = CorpusSpec(n_facts=2, docs_per_fact=(2, 2), pydoc_chars=3_000, stdlib_chars=0, vocab_size=300,
                        n_heldout=2, prompt_words=8, completion_words=4)
TOY_MODEL = ModelSpec(n_layer=1, n_embd=8, n_head=2, epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_corpus(TOY_CORPUS, tmp_path_factory.mktemp("corpus"))


def test_corpus_queries_fit_and_held_out_text_is_held_out(toy, tmp_path_factory):
    """Fact queries ask for a planted name found only in its fact's documents; held-out prompts are
    not in the training text; every query fits one sequence; the cached corpus reloads identically."""
    texts = dict(zip(toy.store.doc_id, toy.store.text))
    for q, ex in zip(toy.queries, toy.examples):
        assert len(ex["input_ids"]) <= toy.max_length
        holders = {d for d, t in texts.items() if q["completion"].strip() in t}
        if q["group"] == "fact":
            fact = next(f for f in toy.facts if f["name"] == q["completion"].strip())
            assert holders and holders <= set(fact["doc_ids"])
        else:
            assert not any(q["prompt"] in t for t in texts.values())
    again = build_corpus(TOY_CORPUS, Path(tmp_path_factory.getbasetemp()) / "corpus0")
    assert again.store.digest() == toy.store.digest() and again.queries == toy.queries


def test_ground_truth_is_seeded_deterministic_and_resumes_to_the_same_values(toy, tmp_path):
    """Two builds with the same settings give the same subsets, seeds and measurements (retraining is
    deterministic); a build killed after 3 of 6 retrainings resumes without redoing one and ends equal
    to the uninterrupted build; the seed changes f (it orders the data) but not the initial weights."""
    calls = []

    def retrain(indices, seed, stop_at=None):
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append((tuple(indices), seed))
        return train_on(toy, TOY_MODEL, indices, seed)

    args = dict(num_subsets=3, seeds=2, seed=4)
    run = partial(build_truth, measure=partial(measure, examples=toy.examples), num_train=len(toy.store))
    with pytest.raises(KeyboardInterrupt):
        run(partial(retrain, stop_at=3), out=tmp_path / "a", **args)
    assert len(GroundTruth.load(tmp_path / "a").missing) == 3
    resumed, timing = run(retrain, out=tmp_path / "a", **args)
    assert len(calls) == 6 and len(set(calls)) == 6 and timing["runs"] == 6
    fresh, _ = run(retrain, out=tmp_path / "b", **args)
    for name in ("subsets", "seeds", "measurements"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(fresh, name))
    assert resumed.subsets.shape == (3, round(len(toy.store) / 2)) and (tmp_path / "a" / TIME_FILE).is_file()
    m = resumed.measurements
    assert np.isfinite(m).all() and not np.array_equal(m[:, 0], m[:, 1])
    a, b = train_on(toy, TOY_MODEL, resumed.subsets[0], 1), train_on(toy, TOY_MODEL, resumed.subsets[0], 2)
    assert not np.array_equal(measure(a, toy.examples), measure(b, toy.examples))
    untrained = train_on(toy, replace(TOY_MODEL, epochs=0), [0], seed=9).state_dict()
    initial = make_model(len(toy.tokenizer), toy.max_length, TOY_MODEL.settings(), TOY_MODEL.init_seed).state_dict()
    assert all(torch.equal(untrained[k], initial[k]) for k in initial)


# ------------------------------------------------------------- convex oracle

V, RIDGE = 5, 0.05


class Bigram(nn.Module):
    """A causal LM that is linear in its weights: logits_t = W · one_hot(token_t)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(V, V, bias=False).double()

    def forward(self, input_ids, attention_mask=None):
        return self.proj(F.one_hot(input_ids, V).double())


def markov_data(n_train=40, n_queries=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(2 * torch.randn(V, V, generator=g, dtype=torch.float64), 1)

    def chain(k):
        x = [int(torch.randint(V, (1,), generator=g))]
        for _ in range(k - 1):
            x.append(int(torch.multinomial(trans[x[-1]], 1, generator=g)))
        return torch.tensor(x)

    train = [{"input_ids": chain(length)} for _ in range(n_train)]
    queries, seen = [], set()
    while len(queries) < n_queries:  # distinct prompt + completion pairs
        x = chain(4)
        if tuple(x.tolist()) not in seen:
            seen.add(tuple(x.tolist()))
            queries.append({"input_ids": x, "labels": torch.cat([torch.full((2,), -100), x[2:]])})
    return train, queries


def fit_bigram(examples):
    """argmin_W (1/K) Σ_z L(z, W) + (RIDGE/2)‖W‖² by Newton's method (convex: converges to the optimum)."""
    task = li.CausalLMTask()
    batch = task.collate(examples)
    model = Bigram()
    nn.init.zeros_(model.proj.weight)

    def objective(w):
        return task.loss(torch.func.functional_call(model, {"proj.weight": w}, (batch["input_ids"],)), batch).mean() + RIDGE / 2 * w.square().sum()

    w = torch.zeros(V, V, dtype=torch.float64)
    for _ in range(30):
        g = torch.func.grad(objective)(w).reshape(-1)
        h = torch.autograd.functional.hessian(objective, w).reshape(V * V, V * V)
        w = w - torch.linalg.solve(h, g).reshape(V, V)
        if float(g.norm()) < 1e-12:
            break
    with torch.no_grad():
        model.proj.weight.copy_(w)
    return model, objective


def exact_influence(model, objective, train, queries):
    """-∇fᵀ H⁻¹ ∇L(z) with H the dense Hessian of the ridge objective: the oracle [Q, N]."""
    task = li.CausalLMTask()
    w = model.proj.weight.detach()

    def per_example(fn, ex):
        b = task.collate([ex])
        return torch.func.grad(lambda v: fn(torch.func.functional_call(model, {"proj.weight": v}, (b["input_ids"],)), b).sum())(w).reshape(-1)

    h = torch.autograd.functional.hessian(objective, w).reshape(V * V, V * V)
    grads_f = torch.stack([per_example(task.measurement, q) for q in queries])  # [Q, P]
    grads_l = torch.stack([per_example(task.loss, z) for z in train])  # [N, P]
    return -torch.linalg.solve(h, grads_f.T).T @ grads_l.T


def test_convex_lm_oracle_has_high_lds_and_the_runner_matches_it(tmp_path):
    """On a convex bigram LM retrained to its optimum: LiSSA through the benchmark's runner (full batch,
    deep) equals the dense exact influence (Gauss–Newton = Hessian for a linear softmax model, λ = the
    ridge); the oracle's LDS is high and its negation's equally low; retraining has no seed noise, which
    the diagnostics report; cosine scores are cosines; every method of the table gives [Q, N] scores."""
    train, queries = markov_data()
    model, objective = fit_bigram(train)
    oracle = exact_influence(model, objective, train, queries)
    ctx = Context(model=model, train=train, train_tokens=[e["input_ids"].tolist() for e in train], queries=queries,
                  query_tokens=[q["input_ids"].tolist() for q in queries], modules=("proj",), damping=RIDGE,
                  lissa={"lissa_depth": 400, "lissa_batch_size": len(train)}, batch_size=16)
    runs = {name: run_method(m, ctx) for name, m in METHODS.items()}
    for name, r in runs.items():
        assert r["scores"].shape == (len(queries), len(train)) and torch.isfinite(r["scores"]).all(), name
    # a deterministic series on exact products: converged to far below these tolerances
    torch.testing.assert_close(runs["lissa"]["scores"], oracle, rtol=1e-6, atol=1e-9 * float(oracle.abs().max()))
    cos = runs["cosine"]["scores"]
    assert float(cos.abs().max()) <= 1 + 1e-12 and float(cos.abs().max()) > 0.3
    with pytest.raises(ValueError, match="identity"):
        run_method(Method("bad", kind="cosine", fit={"strategy": "ekfac"}), ctx)

    truth, _ = build_truth(lambda idx, seed: fit_bigram([train[i] for i in idx])[0], partial(measure, examples=queries),
                           len(train), tmp_path, num_subsets=30, seeds=2)
    groups = np.array(["a", "a", "b", "b"])
    res = summarize({"oracle": oracle, "negated": -oracle, "lissa": runs["lissa"]["scores"]}, truth, groups)
    # measured 0.98-1.00 per query: first order misses little of dropping half the data here
    assert res["oracle"]["all"]["mean"] > 0.95 and min(res["oracle"]["per_query"]) > 0.9
    assert res["negated"]["all"]["mean"] == pytest.approx(-res["oracle"]["all"]["mean"])
    assert res["oracle"]["a"]["mean"] == pytest.approx(np.mean(res["oracle"]["per_query"][:2]))
    vs = paired(res, "oracle", groups)
    assert vs["negated"]["all"]["mean"] == pytest.approx(-2 * res["oracle"]["all"]["mean"]) and vs["negated"]["b"]["wins"] == 0
    diag = truth_diagnostics(truth, groups)
    assert diag["all"]["seed_sd"] == 0 and diag["all"]["seed_spearman"] == pytest.approx(1) and diag["b"]["ceiling"] == pytest.approx(1)
    assert diag["all"]["subset_sd"] > 0
