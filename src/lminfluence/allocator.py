"""Keep the CPU heap from growing with freed memory (glibc).

glibc's malloc serves a request of at least its mmap threshold with a fresh
mapping, returned to the system when freed. The threshold starts at 128 KiB
but rises to the size of each freed mapping, up to 32 MiB. After the first
large tensor is freed, every tensor below 32 MiB comes from the heap instead.
Freed heap blocks between live ones cannot be returned, so a long pass that
allocates and frees tensors of a few MiB per layer grows its resident memory
batch after batch. Scoring SmolLM2-135M with per-token details grew by about
0.6 GB per sequence and was killed for memory after 20 sequences.

``steady_heap`` pins the threshold at 1 MiB: larger tensors always get their
own mapping and go back to the system when freed. It changes a process-wide
setting, once, when a pass over a model starts on the CPU (``run_pass``);
the environment variable ``MALLOC_MMAP_THRESHOLD_`` (glibc's own), when set,
is left to rule, and other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@functools.cache
def steady_heap() -> bool:
    """Pin glibc's mmap threshold at ``MMAP_THRESHOLD`` (once per process). True when it is pinned."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return True  # the user's own setting rules (glibc read it at start)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        done = False
    logger.debug("glibc mmap threshold pinned at %d bytes: %s", MMAP_THRESHOLD, done)
    return done


__all__ = ["steady_heap", "MMAP_THRESHOLD"]
