"""The C allocator's handling of freed memory in a training process (run.host_memory).

glibc serves allocations above its mmap threshold (128 KiB at first, raised dynamically) with
fresh mappings and returns them to the OS when freed; the top of the heap is trimmed once
128 KiB lie free there. A training step allocates and frees the same activation and gradient
buffers every time, so with these defaults each step faults the same pages in again: about
1,200-1,500 minor page faults per step of configs/char.yaml on CPU, 3% of its time
(docs/performance.md). 'reuse' raises the mmap threshold to glibc's maximum (32 MiB; larger
blocks, rare on CPU, still map and unmap) and turns trimming off, so freed blocks stay in the
heap for the next step; the process then holds its high-water mark, as CUDA's caching allocator
does on a GPU. Only glibc has `mallopt`: elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # HEAP_MAX_SIZE / 2 on 64-bit glibc: larger is refused
NEVER_TRIM = 2**31 - 1  # mallopt takes an int; the threshold is bytes free at the heap's top


def glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Keep freed blocks for reuse (see the module docstring). True where glibc accepted the
    settings; False on other C libraries."""
    libc = glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1 and ok
