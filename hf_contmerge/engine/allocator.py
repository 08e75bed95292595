"""The C allocator's settings for a merge process: freed slice buffers are reused, not handed back.

A step allocates and frees the same few buffer sizes for every slice (reads, float32 copies, kernel
outputs, codes): ~16 MiB each, in three threads. With glibc's defaults those come from per-thread
arenas whose heaps shrink as soon as a slice is freed, and from ``mmap`` above a moving threshold, so
the pages go back to the kernel and every slice faults fresh, zeroed pages in again: hundreds of
thousands of faults a step. On a virtual machine that hands freed guest memory back to its host (free
page reporting, as on this project's machines) a fresh page costs 6–9 µs, and a step spent more of its
CPU in the kernel touching fresh pages than in its kernels (``benchmarks/RESULTS.md``, 2026-12-04).
:func:`keep_freed_memory` makes glibc keep what a step frees for the next slice: the ``mmap`` threshold
fixed at its maximum (32 MiB, so slice buffers come from the heap), a trim threshold of 1 GiB (the heap
is not shrunk under that) and, for data-free merges, one arena for all threads (a buffer freed by the
main thread returns to the pool the reader takes from: half the faults again). A data-dependent method
keeps glibc's arenas: its calibration runs tokenizers and data loaders whose many threads would contend
for one arena's lock. Peak memory is unchanged (what is kept is what the step held at its peak); RSS
just does not fall between slices. Between steps :func:`release_freed_memory` hands the free pages back
all the same. Hand-written with ``ctypes`` because no library exposes ``mallopt``; other C libraries are
left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def keep_freed_memory(one_arena: bool = True) -> bool:
    """Apply the settings above once per process (glibc only; ``one_arena``: the data-free merges'); whether
    they were applied."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; each setting stands alone
    return all([mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1, mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1,
                not one_arena or mallopt(M_ARENA_MAX, 1) == 1])


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system between steps (glibc's ``malloc_trim``). A step
    frees tensors of every size; left to itself, glibc raises its mmap threshold as large blocks are
    freed, later ones come from the heap, and its fragments made each step's peak RSS 0.2 GiB higher
    than the last (benchmarks/RESULTS.md, calibration memory). Elsewhere than glibc: nothing to do."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
