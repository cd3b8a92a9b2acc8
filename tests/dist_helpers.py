"""Running a function on K CPU processes joined in a gloo process group, from a test (no torchrun needed)."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - handed back to the test
        result = ("error", f"{type(e).__name__}: {e}")
    finally:
        with open(Path(out_dir) / f"{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        # no rank tears its connections down while another still reads from them (an error raised on every
        # rank by ``distributed.check`` leaves them in step too); a rank that never arrives fails the barrier
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=300))
        dist.destroy_process_group()


def run_ranks(fn: Callable, *args: Any, world: int = 2) -> list[tuple[str, Any]]:
    """``fn(*args)`` on ``world`` processes (gloo); per rank ("ok", result) or ("error", message)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), fn, args, out), nprocs=world, join=True, start_method="spawn")
        results = []
        for r in range(world):
            with open(Path(out) / f"{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
    return results
