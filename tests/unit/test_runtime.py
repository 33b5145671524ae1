"""vlm2rec_ray.runtime: local environment defaults and the driver's freed-memory trimming."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest

from vlm2rec_ray import runtime


def test_returning_freed_memory_trims_periodically_and_at_exit() -> None:
    calls: list[tuple[int, str]] = []

    def fake_trim(pad: int) -> int:
        calls.append((pad, threading.current_thread().name))
        return 1

    with runtime.returning_freed_memory(0.02, trim=fake_trim):
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(calls) >= 4  # three from the background thread, one at exit
    assert all(pad == 0 for pad, _ in calls)
    assert {name for _, name in calls[:3]} == {"vlm2rec-malloc-trim"}
    assert calls[-1][1] == threading.current_thread().name
    n = len(calls)
    time.sleep(0.1)
    assert len(calls) == n  # the thread stopped with the block
    assert not any(t.name == "vlm2rec-malloc-trim" for t in threading.enumerate())


def test_returning_freed_memory_is_a_no_op_when_disabled() -> None:
    calls: list[int] = []
    with runtime.returning_freed_memory(0, trim=lambda pad: calls.append(pad) or 0):
        pass
    assert calls == []


def test_returning_freed_memory_trims_at_exit_even_when_the_block_raises() -> None:
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), runtime.returning_freed_memory(60, trim=lambda p: calls.append(p) or 1):
        raise RuntimeError("boom")
    assert calls == [0]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(runtime.malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_malloc_trim_returns_fragmented_free_heap_to_the_os() -> None:
    """The driver's case in small: many small native blocks, most freed but interleaved with survivors, so
    glibc cannot shrink its heap by itself; one trim hands the free pages back."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    block, n = 4096, 40_000  # 160 MiB in 4 KiB blocks (below the mmap threshold: they live in the heap)
    ptrs = []
    for _ in range(n):
        p = libc.malloc(block)
        libc.memset(p, 1, block)  # touch the pages
        ptrs.append(p)
    keep = set(ptrs[::64])  # one survivor every 256 KiB pins the heap
    for p in ptrs:
        if p not in keep:
            libc.free(p)
    try:
        before = _rss_mib()
        runtime.malloc_trim()(0)  # type: ignore[misc]
        after = _rss_mib()
    finally:
        for p in keep:
            libc.free(p)
    assert before - after > 100, f"RSS {before:.0f} -> {after:.0f} MiB after malloc_trim"
