"""The CPU heap does not keep freed tensors (glibc's mmap threshold pinned by ``steady_heap``)."""

import platform
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import sys
    import torch
    import lminfluence  # noqa: F401  (both modes: the same heap before the probe)

    def rss():
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    if sys.argv[1] == "pinned":
        from lminfluence.allocator import steady_heap

        assert steady_heap()
    big = torch.ones(1 << 22)  # 16 MiB, freed: glibc raises its threshold to 16 MiB unless pinned
    del big
    keep, temp = [], []
    for _ in range(20):
        temp.append(torch.ones(1 << 20))  # 4 MiB each
        keep.append(torch.ones(1 << 16))  # a small live block (256 KiB) after each
    before = rss()
    del temp
    print(before - rss())
    """
)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_tensors_go_back_to_the_system():
    """Twenty freed 4 MiB tensors, each followed by a small live one, after a 16 MiB tensor was
    freed: with the threshold pinned they were mappings of their own and their 80 MiB leave the
    process; with glibc's default they sat in the heap between live blocks and stayed. A fresh
    interpreter each (the setting is process-wide).
    """
    env = {"MALLOC_MMAP_THRESHOLD_": ""}
    returned = {}
    for mode in ("pinned", "default"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={k: v for k, v in __import__("os").environ.items() if k not in env})
        returned[mode] = int(out.stdout.strip())
    assert returned["pinned"] >= 70 * 2**20, returned
    assert returned["default"] <= 10 * 2**20, returned  # the effect is real: without the pin nothing came back
