"""Approximate tier on a toy LM trained here: low-rank queries and the sign of a score."""

import copy

import pytest
import torch
from helpers import spearman, tiny_llama

import lminfluence as li

VOCAB, LENGTH = 64, 32


def markov_corpus(n: int, seed: int) -> list[dict]:
    """Sequences from a sparse random bigram chain (each token has 3 likely successors)."""
    g = torch.Generator().manual_seed(0)  # the same chain for every seed
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = [int(torch.randint(0, VOCAB, (), generator=g))]
        for _ in range(LENGTH - 1):
            seq.append(int(successors[seq[-1], torch.randint(0, 3, (), generator=g)]))
        out.append({"input_ids": torch.tensor(seq)})
    return out


@pytest.fixture(scope="module")
def trained():
    """A 2-layer Llama (hidden 64, MLP 128) trained for 150 Adam steps on the chain."""
    model = tiny_llama(seed=0, dtype=torch.float32, vocab=VOCAB, hidden=64, mlp=128)
    train = markov_corpus(192, seed=1)
    ids = torch.stack([e["input_ids"] for e in train])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        batch = ids[torch.randint(0, len(ids), (32,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.double()
    queries = []
    for e in markov_corpus(6, seed=7):
        labels = e["input_ids"].clone()
        labels[:24] = -100
        queries.append({"input_ids": e["input_ids"], "labels": labels})
    factors = li.fit_factors(model, train, execution=li.Execution(batch_size=32))
    return model, train, queries, factors


def test_rank_32_queries_keep_the_ranking(trained):
    """Rank-32 factorised queries (layers 64×128, so truly truncated) keep Spearman ≥ 0.9
    with full-rank scores for every query (the paper's query-batching claim)."""
    model, train, queries, factors = trained
    full = li.compute_scores(model, factors, queries, train, execution=li.Execution(batch_size=32))
    low = li.compute_scores(model, factors, queries, train, li.ScoreConfig(query_rank=32), execution=li.Execution(batch_size=32))
    rhos = [spearman(low.total[q], full.total[q]) for q in range(len(queries))]
    assert min(rhos) >= 0.9, rhos
    assert not torch.allclose(low.total, full.total)  # the truncation is real


def log_prob(model, query) -> float:
    with torch.no_grad():
        logits = model(input_ids=query["input_ids"].unsqueeze(0)).logits[0, :-1]
        target = query["labels"][1:]
        keep = target != -100
        return float(torch.log_softmax(logits, -1)[keep].gather(1, target[keep].unsqueeze(1)).sum())


def step_on(model, example, lr: float, only: set[str] | None = None):
    """One SGD step on the summed loss of a single training sequence (on the modules ``only``, if given)."""
    stepped = copy.deepcopy(model)
    if only is not None:
        for name, p in stepped.named_parameters():
            p.requires_grad_(name.rpartition(".")[0] in only)
    ids = example["input_ids"].unsqueeze(0)
    logits = stepped(input_ids=ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    loss.backward()
    with torch.no_grad():
        for p in stepped.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return stepped


def test_sign_top_sequence_raises_log_prob_more_than_bottom(trained):
    """Positive = helps: one small training step on the EK-FAC top-scored sequence raises
    the query's log p(completion) more than a step on the bottom-scored one, for every query."""
    model, train, queries, factors = trained
    scores = li.compute_scores(model, factors, queries, train, execution=li.Execution(batch_size=32))
    for q, query in enumerate(queries):
        base = log_prob(model, query)
        top, bottom = int(scores.total[q].argmax()), int(scores.total[q].argmin())
        gain_top = log_prob(step_on(model, train[top], 1e-5), query) - base
        gain_bottom = log_prob(step_on(model, train[bottom], 1e-5), query) - base
        assert gain_top > gain_bottom, (q, gain_top, gain_bottom)


def test_identity_score_is_the_first_order_effect_of_a_training_step(trained):
    """Without preconditioning, a step θ − η∇L(z) on the tracked layers changes f by
    η·score(z) to first order: the sign and the scale of the raw score, on 8 sequences."""
    model, train, queries, _ = trained
    factors = li.fit_factors(model, train, li.FactorConfig(strategy="identity"))
    query = queries[0]
    scores = li.compute_scores(model, factors, [query], train[:8]).total[0]
    # central differences: the step is large enough that the float32 inside transformers'
    # Llama (RMSNorm) is below the signal, and the second-order term cancels
    lr = 1e-4
    tracked = set(factors.layers)

    def central(z):
        return (log_prob(step_on(model, z, lr, tracked), query) - log_prob(step_on(model, z, -lr, tracked), query)) / (2 * lr)

    measured = torch.tensor([central(z) for z in train[:8]], dtype=torch.float64)
    torch.testing.assert_close(measured, scores, rtol=1e-3, atol=1e-3 * float(scores.abs().max()))
