"""`training/host_memory.py`: pinning glibc's mmap threshold for the training process.

glibc raises its mmap threshold to the size of every mmap'd block freed, so a step's
later buffers come from the heap, and a freed one in the middle of the heap stays
resident. Pinned, each large block is its own mapping and leaves the process on free.
The allocator is process-wide state, so each case runs in a child process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import tiny_config

CHILD = r"""
import ctypes, sys
from frcnn_jax.training import host_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "pinned":
    assert host_memory.pin_mmap_threshold(1)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
mib = 2**20
p = libc.malloc(24 * mib)  # mmap'd; freeing it raises glibc's adaptive threshold to 24 MiB
ctypes.memset(p, 1, 24 * mib)
libc.free(p)
before = rss_mib()
a, b = libc.malloc(16 * mib), libc.malloc(16 * mib)  # heap blocks unless pinned: b keeps a's pages in
ctypes.memset(a, 1, 16 * mib)
ctypes.memset(b, 1, 16 * mib)
libc.free(a)
print(rss_mib() - before)
"""


def _resident_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_pinned_threshold_returns_a_freed_buffer_to_the_os():
    adaptive, pinned = _resident_after_free("adaptive"), _resident_after_free("pinned")
    assert adaptive > 30, adaptive  # both 16 MiB blocks stay resident after one is freed
    assert pinned < 20, pinned  # only the live one


def test_threshold_setting_is_checked():
    from frcnn_jax.training import host_memory
    from frcnn_jax.training.loop import validate_config

    with pytest.raises(ValueError, match=r"malloc_mmap_threshold_mb=0: must be > 0"):
        host_memory.pin_mmap_threshold(0)
    config = tiny_config.get_config()
    config.train.malloc_mmap_threshold_mb = -1
    with pytest.raises(ValueError, match=r"train.malloc_mmap_threshold_mb=-1: must be >= 0 \(0: glibc's own\)"):
        validate_config(config)
