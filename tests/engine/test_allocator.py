"""The allocator settings of a merge process (``engine/allocator.py``): glibc takes every one of them."""

from __future__ import annotations

import platform

import pytest

from hf_contmerge.engine import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_every_setting_once_per_process():
    allocator.keep_freed_memory.cache_clear()
    for one_arena in (False, True):  # a data-dependent method's settings, a data-free one's
        assert allocator.keep_freed_memory(one_arena) is True  # mallopt answered 1 to each (0: a value it refused)
        assert allocator.keep_freed_memory(one_arena) is True  # and again without a second call into libc
    assert allocator.keep_freed_memory.cache_info().hits == 2
    allocator.release_freed_memory()  # malloc_trim: callable between steps
