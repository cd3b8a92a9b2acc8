"""Data parallelism over ``torch.distributed``, as launched by ``torchrun``.

Who this process is, the few collectives the passes need, and errors that stop
every rank instead of leaving the others waiting.

Nothing here starts processes: ``torchrun --nproc-per-node K -m lminfluence …`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) does, and ``init`` joins the group it describes.
A process group the user initialised already is used as it is. Without one, every function behaves as
for a single process (rank 0 of 1), so the library's code paths are the same either way.

Synchronisation happens once per pass, never inside a hook: each rank computes on its own shard of the
data, then ``check`` runs a small collective in which every rank reports whether it failed; if any did,
all raise ``DistributedError`` with the failing rank's message (a rank that died outright is handled by
``torchrun``, which stops the others).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import LminfluenceError

logger = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT_SECONDS = float(os.environ.get("LMINFLUENCE_DIST_TIMEOUT", "1800"))


class DistributedError(LminfluenceError):
    """Another rank failed; this rank stops too (the message names the rank and its error)."""


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (or in a single process): the one that logs, draws bars and writes shared files."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: str | torch.device | None = None) -> bool:
    """Join the process group that torchrun's environment describes; False when there is none (one process).

    Picks NCCL when ``device`` (default: CUDA when available) is a GPU, gloo otherwise, and
    on CUDA binds this process to its ``LOCAL_RANK``'s GPU. Idempotent.
    """
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(dev), timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    global _owned
    _owned = True
    if dist.get_rank() == 0:
        logger.info("%d processes joined the process group (%s)", dist.get_world_size(), dist.get_backend())
    return True


_owned = False  # True when ``init`` created the process group (then ``shutdown`` destroys it)


def shutdown() -> bool:
    """Leave the process group ``init`` joined (a process that exits with gloo's threads alive aborts); True when it did."""
    global _owned
    left = _owned and dist.is_initialized()
    if left:
        dist.destroy_process_group()
    _owned = False
    return left


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every world_size-th one, from its rank (deterministic, balanced)."""
    return list(items[rank() :: world_size()])


def owner(index: int) -> int:
    """The rank that owns item ``index`` under ``shard``."""
    return index % world_size()


def span(n: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of ``n`` items (balanced: sizes differ by at most one; rank order)."""
    r, w = rank(), world_size()
    return n * r // w, n * (r + 1) // w


class Slice:
    """Items lo, …, hi - 1 of ``data`` (indexed when it can be, else iterated): a rank's contiguous shard."""

    def __init__(self, data: Iterable[Any], lo: int, hi: int) -> None:
        self.data, self.lo, self.hi = data, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.data[self.lo + i]  # type: ignore[index]

    def __iter__(self) -> Iterator[Any]:
        if hasattr(self.data, "__getitem__"):
            return (self.data[i] for i in range(self.lo, self.hi))
        return itertools.islice(self.data, self.lo, self.hi)


def sharded_model(model: torch.nn.Module) -> bool:
    """True when ``model`` has modules sharded by FSDP (``fully_shard``): its forward passes are collectives."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return active() and any(isinstance(m, FSDPModule) for m in model.modules())


def require_same_batches(model: torch.nn.Module, num_local: int, batch_size: int, what: str, always: bool = False) -> None:
    """Raise, on every rank, when an FSDP-sharded model would run different numbers of batches on different ranks.

    Each forward pass of a sharded model gathers the weights from all ranks, so
    every rank must run as many as the others: ``num_local`` sequences in
    batches of ``batch_size`` must give the same count everywhere. ``always``:
    check for any model (layer-owned factors exchange captures after every batch).
    """
    if not (always and active()) and not sharded_model(model):
        return
    counts = all_gather_objects((num_local, -(-num_local // batch_size)))
    if len({c for _, c in counts}) > 1:
        sizes = [n for n, _ in counts]
        fits = [b for b in range(1, max(sizes) + 1) if len({-(-n // b) for n in sizes}) == 1]
        raise DistributedError(
            f"{what}: with an FSDP-sharded model (or factors placed by layer) every rank must run the same number of batches, but the ranks' shares of "
            f"{sizes} sequences in batches of {batch_size} give {[c for _, c in counts]}; choose a batch size that gives "
            f"each rank the same count (e.g. {fits[-1] if fits else 1}), or another number of processes"
        )


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


BUCKET_BYTES = 64 * 2**20  # small tensors are summed together in flat buffers of at most this size


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over all ranks, in place, as float64 whatever their dtype.

    Small tensors travel together in flat buffers of at most ``BUCKET_BYTES``; a larger one that
    is float64 already, contiguous and on the collective's device is summed where it is (no copy),
    so that the running sums of a fit need no second copy of themselves.
    """
    if not active() or not tensors:
        return
    device = _device_of(tensors)
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if t.dtype == torch.float64 and t.is_contiguous() and t.device == device and t.numel() * 8 > BUCKET_BYTES:
            dist.all_reduce(t)
            continue
        if bucket and (size + t.numel()) * 8 > BUCKET_BYTES:
            _reduce_flat(bucket, device)
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        _reduce_flat(bucket, device)


def _reduce_flat(tensors: list[torch.Tensor], device: torch.device) -> None:
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def gather_cat(t: torch.Tensor, dim: int, pad_dims: Sequence[int] = ()) -> torch.Tensor:
    """Every rank's ``t`` concatenated along ``dim`` in rank order (on every rank, on ``t``'s device).

    Sizes along ``dim`` may differ between ranks; so may those along ``pad_dims``, which are
    zero-padded to the largest. All other sizes and the dtype must agree.
    """
    if not active():
        return t
    shapes = all_gather_objects(tuple(t.shape))
    dim = dim % t.dim()
    full = [max(s[d] for s in shapes) if d == dim or d in {p % t.dim() for p in pad_dims} else t.shape[d] for d in range(t.dim())]
    device = _device_of([t])
    padded = torch.zeros(full, dtype=t.dtype, device=device)
    padded[tuple(slice(0, n) for n in t.shape)] = t.to(device)
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    trimmed = []
    for part, shape in zip(parts, shapes):
        keep = [slice(0, shape[d]) if d == dim else slice(None) for d in range(t.dim())]
        trimmed.append(part[tuple(keep)])
    return torch.cat(trimmed, dim=dim).to(t.device)


def gather_to(t: torch.Tensor, dst: int, shapes: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """Every rank's ``t`` [B_r, …] concatenated along dim 0 in rank order, on rank ``dst`` only (None elsewhere).

    ``shapes`` holds every rank's ``t.shape`` (all ranks pass the same list); the other
    dims may differ between ranks and are zero-padded at their ends to the largest.
    """
    if not active():
        return t
    full = [max(s[d] for s in shapes) for d in range(t.dim())]
    device = _device_of([t])
    padded = torch.zeros(full, dtype=t.dtype, device=device)
    padded[tuple(slice(0, n) for n in t.shape)] = t.to(device)
    parts = [torch.empty_like(padded) for _ in shapes] if rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if parts is None:
        return None
    return torch.cat([p[: s[0]] for p, s in zip(parts, shapes)]).to(t.device)


def send_to(tensors: Sequence[torch.Tensor], src: int, dst: int, shapes: Sequence[tuple[Sequence[int], torch.dtype]]) -> list[torch.Tensor]:
    """Rank ``src``'s ``tensors`` received by rank ``dst`` (which passes their shapes and dtypes; every other rank passes nothing and gets [])."""
    if src == dst:
        return list(tensors) if rank() == src else []
    device = _device_of(tensors)
    if rank() == src:
        for t in tensors:
            dist.send(t.contiguous().to(device), dst)
        return []
    if rank() != dst:
        return []
    out = []
    for shape, dtype in shapes:
        buf = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(buf, src)
        out.append(buf)
    return out


def broadcast_(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s (shapes and dtypes must agree)."""
    if not active():
        return
    device = _device_of(tensors)
    for t in tensors:
        buf = t.to(device)
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf.to(t.device))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled: for small things, not for tensors of many MB)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    """Wait until every rank got here."""
    if active():
        dist.barrier()


def check(error: BaseException | None = None) -> None:
    """A synchronisation point: raise on every rank if any rank arrives with an ``error``.

    Call it on every rank, at the same point of the computation, before a collective: a rank
    that failed reports its error instead of entering the collective the others wait in.
    """
    if not active():
        if error is not None:
            raise error
        return
    reports = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:  # every rank is here and about to raise: let all finish the exchange before any tears the group down
        dist.barrier()
    if error is not None:
        raise error
    if failed:
        r, message = failed[0]
        raise DistributedError(f"rank {r} failed: {message}")


@contextmanager
def checked() -> Iterator[None]:
    """Run a block of local work (no collective inside), then ``check`` on every rank with its outcome."""
    try:
        yield
    except Exception as e:  # reported to the other ranks, then raised here
        check(e)
        raise
    check(None)


__all__ = [
    "DistributedError",
    "active",
    "rank",
    "world_size",
    "is_main",
    "init",
    "shutdown",
    "shard",
    "owner",
    "span",
    "Slice",
    "sharded_model",
    "require_same_batches",
    "all_reduce_sum_",
    "gather_cat",
    "broadcast_",
    "gather_to",
    "send_to",
    "all_gather_objects",
    "broadcast_object",
    "barrier",
    "check",
    "checked",
    "backend_for",
]
