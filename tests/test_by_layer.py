"""Layer-owned factors (``Execution(factor_placement="by_layer")``) on 2 CPU processes (gloo) with an FSDP-sharded model.

Each tracked layer's factors live on one rank, which receives every rank's captures of that layer;
the factors, their files and the scores must be those of one process holding everything.
"""

from __future__ import annotations

import pytest

from dist_helpers import run_ranks


def _shard_llama(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def _fit(strategy: str, owned: bool, out_dir: str | None = None, shard: bool = True, label_draws: int = 1):
    """A tiny float64 Llama (gated MLP: gate and up share ā) on 24 sequences in batches of 4, FSDP-sharded under
    torch.distributed when ``shard``, ``label_draws`` label sets per sequence; every tensor this rank holds, the owners,
    bytes, and P = (G+λI)⁻¹V of a fixed V per layer."""
    import torch

    import lminfluence as li
    from helpers import random_sequences, tiny_llama
    from lminfluence import distributed as d

    model, train = tiny_llama(layers=2), random_sequences(24)
    if d.active() and shard:
        _shard_llama(model)
    ex = li.Execution(batch_size=4, factor_placement="by_layer" if owned else "replicated")
    config = li.FactorConfig(strategy=strategy, label_draws=label_draws)
    factors = li.fit_factors(model, train, config, execution=ex, output_dir=out_dir)
    g = torch.Generator().manual_seed(0)
    applied, means = {}, {}
    for name, info in factors.layers.items():
        v = torch.randn(3, info.out_features, info.in_features + int(info.bias), generator=g, dtype=torch.float64)
        means[name] = factors.curvature.mean_eigenvalue(name)
        if name in factors.curvature.state:
            applied[name] = factors.curvature.precondition(name, v, 0.1 * means[name])
    return {
        "state": dict(factors.curvature.state_dict()),
        "held": sorted(factors.curvature.state),
        "owners": factors.curvature.owners,
        "nbytes": factors.nbytes,
        "counts": (factors.num_tokens, factors.num_sequences),
        "applied": applied,
        "means": means,
        "replayed": factors.meta.get("second_pass_replayed"),
    }


def _close(a, b, rtol, what):
    import torch

    torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * a.abs().max(), msg=what)


def _same_tensors(one: dict, got: dict, rtol: float = 1e-10) -> None:
    """``got``'s tensors within ``rtol`` of ``one``'s: eigenvectors up to each column's sign (eigh's free choice)."""
    import torch

    for key, b in got.items():
        a = one[key]
        if "::q_" in key:
            b = b * torch.sign((a * b).sum(0))
        _close(a, b, rtol, key)


@pytest.mark.parametrize(
    "strategy, shard",
    [("ekfac", True), pytest.param("kfac", True, marks=pytest.mark.slow), pytest.param("diagonal", True, marks=pytest.mark.slow), pytest.param("ekfac", False, marks=pytest.mark.slow)],
)
def test_by_layer_fit_equals_one_process_and_each_rank_holds_its_layers(strategy, shard, tmp_path):
    """Two ranks of an FSDP-sharded float64 Llama, each layer's captures gathered to its owner: the tensors each
    rank holds equal the one-process fit's to 1e-10 relative (only the order of float64 additions differs,
    ~1e-16), and so does the preconditioner applied to V; the two ranks hold disjoint sets of layers that
    together are all of them, a gate and up projection (one shared A) on the same rank, each rank's bytes
    the sum over its layers. The factors rank 0 saves load in one process as the one-process fit's. Unsharded
    (plain data parallel), EK-FAC's second pass replays the first pass's captures and exchanges them again."""
    import torch

    import lminfluence as li

    one = _fit(strategy, False)
    results = run_ranks(_fit, strategy, True, str(tmp_path / "f"), shard)
    assert [s for s, _ in results] == ["ok", "ok"], results
    held = [set(r["held"]) for _, r in results]
    assert not held[0] & held[1] and held[0] | held[1] == set(one["held"]), held
    assert held[0] and held[1], "both ranks own layers"
    owners = results[0][1]["owners"]
    assert owners == results[1][1]["owners"] and {n for n, r in owners.items() if r == 1} == held[1]
    for block in range(2):
        assert owners[f"model.layers.{block}.mlp.gate_proj"] == owners[f"model.layers.{block}.mlp.up_proj"]
    assert sum(r["nbytes"] for _, r in results) == one["nbytes"]  # a shared A is held once, by its owner
    for _, got in results:
        assert got["replayed"] == (strategy == "ekfac" and not shard)
        assert got["counts"] == one["counts"]
        assert {k.partition("::")[0] for k in got["state"]} == set(got["held"])
        _same_tensors(one["state"], got["state"])
        _same_tensors(one["applied"], got["applied"])
        for name, m in one["means"].items():
            assert got["means"][name] == pytest.approx(m, rel=1e-10)
    loaded = li.load_factors(tmp_path / "f")
    flat = {k: v for k, v in loaded.curvature.state_dict().items()}
    assert set(flat) == set(one["state"])
    _same_tensors(one["state"], flat)
    assert loaded.nbytes == one["nbytes"] and loaded.num_sequences == one["counts"][1]
    assert torch.equal(flat[next(iter(results[0][1]["state"]))], results[0][1]["state"][next(iter(results[0][1]["state"]))])


def test_by_layer_fit_with_several_label_draws_equals_one_process():
    """EK-FAC with 3 label draws per sequence (ā gathered once per batch, each draw's ds to the owners): the tensors
    each rank holds and the preconditioner applied to V equal the one-process fit's with the same draws to 1e-10
    relative (only the order of float64 additions differs, ~1e-16), and differ from a one-draw fit's (the draws
    reached the owners' sums)."""
    import torch

    one = _fit("ekfac", False, label_draws=3)
    single_draw = _fit("ekfac", False)
    results = run_ranks(_fit, "ekfac", True, None, True, 3)
    assert [s for s, _ in results] == ["ok", "ok"], results
    assert set(results[0][1]["held"]) | set(results[1][1]["held"]) == set(one["held"])
    for _, got in results:
        assert got["counts"] == one["counts"]
        _same_tensors(one["state"], got["state"])
        _same_tensors(one["applied"], got["applied"])
    lam = next(k for k in one["state"] if k.endswith("::lambda"))
    assert not torch.allclose(one["state"][lam], single_draw["state"][lam], rtol=1e-3), "3 draws give another Λ than 1"


def _scores(owned: bool):
    """Scores of 5 queries against 24 sequences (batches of 4, queries 2 at a time) with EK-FAC factors of the tiny
    float64 Llama: full rank with per-layer and per-token scores, rank 2, self-influence per layer; with ``owned``
    (2 ranks, FSDP-sharded) also the errors of what layer-owned factors refuse."""
    import lminfluence as li
    from helpers import random_queries, random_sequences, tiny_llama
    from lminfluence import distributed as d
    from lminfluence.errors import LminfluenceError
    from lminfluence.scoring.two_stage import TwoStageConfig, two_stage_scores

    model, train, queries = tiny_llama(layers=2), random_sequences(24), random_queries(5)
    if d.active():
        _shard_llama(model)
    ex = li.Execution(batch_size=4, query_batch_size=2, factor_placement="by_layer" if owned else "replicated")
    factors = li.fit_factors(model, train, execution=ex)
    full = li.compute_scores(model, factors, queries, train, li.ScoreConfig(per_layer=True, per_token=True), execution=ex)
    low = li.compute_scores(model, factors, queries, train, li.ScoreConfig(query_rank=2, per_layer=True), execution=ex)
    own = li.compute_self_scores(model, factors, train, li.ScoreConfig(per_layer=True), execution=ex)
    out = {"full": full.total, "low": low.total, "self": own.total, "tokens": full.per_token}
    for prefix, scores in (("layer", full), ("low layer", low), ("self layer", own)):
        out.update({f"{prefix} {n}": t for n, t in scores.per_layer.items()})
    out = {k: v.double().numpy() for k, v in out.items()}
    if owned:
        pq = li.scoring.precondition_queries(model, factors, queries, execution=ex)
        out["preconditioned"] = (sorted(pq), sorted(factors.curvature.state))
        refused = {}
        for what, call in (
            ("cg", lambda: li.compute_scores(model, factors, queries, train, li.ScoreConfig(refine="cg", refine_steps=2), execution=ex)),
            ("two_stage", lambda: two_stage_scores(model, factors, queries, train, li.ScoreConfig(query_rank=2), TwoStageConfig(), execution=ex)),
        ):
            try:
                call()
                refused[what] = None
            except LminfluenceError as e:
                refused[what] = str(e)
        out["refused"] = refused
    return out


def factors_layers(scores: dict) -> set[str]:
    """The tracked layers named by the per-layer keys of ``_scores``'s result."""
    return {k.removeprefix("layer ") for k in scores if k.startswith("layer ")}


def test_by_layer_scores_equal_one_process():
    """Layer-owned EK-FAC factors of an FSDP-sharded float64 Llama on 2 ranks: each owner scores every rank's
    sequences for its layers and the layers' scores are summed over ranks, so both ranks return the one-process
    total, rank-2, per-layer, per-token and self-influence scores to 1e-10 relative (only the order of float64
    additions differs); each rank preconditions the queries for its own layers only; the refinement by CG and the
    two-stage procedure are refused with an error naming the placement."""
    import numpy as np

    one = _scores(False)
    results = run_ranks(_scores, True)
    assert [s for s, _ in results] == ["ok", "ok"], results
    for _, got in results:
        refused = got.pop("refused")
        preconditioned, held = got.pop("preconditioned")
        assert preconditioned == held and 0 < len(held) < len(factors_layers(one)), (preconditioned, held)
        for what, message in refused.items():
            assert message is not None and "factor_placement='by_layer'" in message, (what, message)
        assert set(got) == set(one)
        for key, a in one.items():
            assert got[key].shape == a.shape, key
            np.testing.assert_allclose(got[key], a, rtol=1e-10, atol=1e-10 * np.abs(a).max(), err_msg=key)


def test_owners_keep_shared_inputs_together_and_balance_the_bytes():
    """Llama-3-8B's MLP shapes on 8 ranks (meta tensors: shapes only): a gate and up projection, which share ā and
    so one A factor, get the same owner; every rank gets layers, and the ranks' shares of I² + O² + O·I differ by at
    most the largest group's (greedy largest-first assignment); the assignment depends on nothing but the shapes."""
    import torch

    from lminfluence.hooks.collector import LayerCapture
    from lminfluence.curvature.placement import assign_owners

    captures, cost = {}, {}
    for b in range(32):
        shared = torch.empty(1, 1, 4096, device="meta")
        for name, a, o in (("gate", shared, 14336), ("up", shared, 14336), ("down", torch.empty(1, 1, 14336, device="meta"), 4096)):
            captures[f"{b}.{name}"] = LayerCapture(a=a, ds=torch.empty(1, 1, o, device="meta"))
    owners = assign_owners(captures, 8)
    assert owners == assign_owners(dict(captures), 8)
    load = [0] * 8
    for b in range(32):
        assert owners[f"{b}.gate"] == owners[f"{b}.up"]
        cost[b] = (4096**2 + 2 * (14336**2 + 14336 * 4096), 14336**2 + 4096**2 + 14336 * 4096)
        load[owners[f"{b}.gate"]] += cost[b][0]
        load[owners[f"{b}.down"]] += cost[b][1]
    assert set(owners.values()) == set(range(8))
    assert max(load) - min(load) <= max(cost[0])
