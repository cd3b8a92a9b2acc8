"""Running a function on K CPU processes joined in a gloo process group, from a test (no torchrun needed)."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
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
        # the result is on disk and every rank is past the barrier: leave without the interpreter's teardown, where
        # torch's background threads once aborted a rank ("terminate called without an active exception", 1 CI run in 5)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_ranks(fn: Callable, *args: Any, world: int = 2) -> list[tuple[str, Any]]:
    """``fn(*args)`` on ``world`` processes (gloo); per rank ("ok", result) or ("error", message)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), fn, args, out), nprocs=world, join=True, start_method="spawn")
        results = []
        for r in range(world):
            with open(Path(out) / f"{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
    return results


def torchrun_fit(script: Path, template: str, out: Path, kill: str | None = None, rank: int = 1) -> subprocess.CompletedProcess:
    """``template`` (formatted with the tests' folder) written to ``script`` and run under ``torchrun --nproc-per-node 2``
    with ``out`` as its argument; with ``kill``, rank ``rank`` SIGKILLs itself at that point of the fit."""
    from lminfluence.curvature.checkpoint import KILL_ENV, KILL_RANK_ENV

    script.write_text(template.format(tests=str(Path(__file__).resolve().parent)))
    exe = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, KILL_RANK_ENV)}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if kill:
        env.update({KILL_ENV: kill, KILL_RANK_ENV: str(rank)})
    return subprocess.run([str(exe), "--nproc-per-node", "2", str(script), str(out)], capture_output=True, text=True, timeout=600, env=env)
