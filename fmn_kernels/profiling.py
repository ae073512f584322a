"""Peak memory of a piece of work, on CUDA and on CPU.

CUDA has the caching allocator's counters. CPU has none, so there the work runs under the
profiler with ``profile_memory=True``: every allocation and free of the CPU allocator is an event
that carries the allocator's running total, and the peak is the largest total seen minus the
total before the first event. Both count tensor storage only (no allocator caching, no Python
objects), which is what "peak memory of forward+backward" means when two implementations of an
op are compared. On CPU, a block allocated before ``fn`` started and freed inside it leaves no
event (torch warns once that it has "unknown size"); a peak reached after such a free is then
overstated by at most that block.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

import torch

__all__ = ["peak_allocated_bytes"]


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null: the profiler's native start/stop lines
    ("USDT: ... profiler_start") are written there by Kineto, past Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_native_stderr():
            prof.stop()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation:
            alloc = e.typed[1]
            if alloc.device.type == "cpu":
                events.append((e.start_time_ns, int(alloc.alloc_size), int(alloc.total_allocated)))
        stack.extend(e.children)
    if not events:
        return 0
    events.sort(key=lambda t: t[0])
    base = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - base)


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Bytes of tensor storage that ``fn()`` holds at its peak beyond what was live when it
    started. ``fn`` runs once; on CUDA the device is synchronised around it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type == "cpu":
        return _cpu_peak(fn)
    raise ValueError(f"peak_allocated_bytes: expected a cpu or cuda device, got {device}")
