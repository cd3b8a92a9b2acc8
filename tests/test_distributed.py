"""The distributed helpers on 2 CPU processes (gloo): sums, broadcasts, sharding, and errors that stop every rank."""

from __future__ import annotations

from dist_helpers import run_ranks


def _collectives():
    import torch

    from lminfluence import distributed as d

    t = torch.full((3,), float(d.rank() + 1), dtype=torch.float32)
    d.all_reduce_sum_([t])
    b = torch.full((2,), float(d.rank()))
    d.broadcast_([b], src=1)
    return {"rank": d.rank(), "world": d.world_size(), "sum": t.tolist(), "bcast": b.tolist(), "shard": d.shard(list(range(5))), "gathered": d.all_gather_objects(d.rank() * 10)}


def _one_rank_fails():
    from lminfluence import distributed as d

    with d.checked():
        if d.rank() == 1:
            raise ValueError("bad shard")
    return "unreachable"


def test_collectives_on_two_processes():
    """Sums are over ranks (1 + 2 = 3), a broadcast copies the source's values, shards are disjoint and cover everything."""
    results = run_ranks(_collectives)
    assert [s for s, _ in results] == ["ok", "ok"], results
    a, b = (r for _, r in results)
    assert a["world"] == b["world"] == 2 and (a["rank"], b["rank"]) == (0, 1)
    assert a["sum"] == b["sum"] == [3.0, 3.0, 3.0]
    assert a["bcast"] == b["bcast"] == [1.0, 1.0]
    assert sorted(a["shard"] + b["shard"]) == [0, 1, 2, 3, 4] and not set(a["shard"]) & set(b["shard"])
    assert a["gathered"] == b["gathered"] == [0, 10]


def test_an_error_on_one_rank_stops_every_rank():
    """Rank 1 fails inside a checked block: it raises its own error, and rank 0 raises DistributedError naming rank 1 (no hang)."""
    (s0, m0), (s1, m1) = run_ranks(_one_rank_fails)
    assert (s0, s1) == ("error", "error")
    assert m1 == "ValueError: bad shard"
    assert m0.startswith("DistributedError: rank 1 failed: ValueError: bad shard")


def test_single_process_is_rank_zero_of_one():
    from lminfluence import distributed as d

    assert (d.rank(), d.world_size(), d.is_main(), d.shard([1, 2, 3])) == (0, 1, True, [1, 2, 3])
