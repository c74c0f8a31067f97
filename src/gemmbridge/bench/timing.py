"""Timing: device time per call, and host µs per call.

GPU: ``triton.testing.do_bench`` (median, warm-up excluded, L2 flushed before each call) when Triton is
installed, else CUDA events around each call (median). CPU: ``time.perf_counter`` around loops of calls
long enough to measure, median of the loops. Candidates are interleaved (A B C A B C ...) and each keeps
its best median, so that clock and thermal drift hit every candidate alike.

Host µs per call: N eager calls with no synchronization, then one, divided by N (on the CPU this is just
the time per call).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def synchronize(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def _cpu_ms(fn: Callable[[], Any], rep_ms: float) -> float:
    """Median ms per call over loops of at least ~1 ms each, about ``rep_ms`` in all."""
    t0 = time.perf_counter()
    fn()  # warm-up
    once = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(1e-3 / once))
    loops = max(3, min(50, int(rep_ms * 1e-3 / (once * calls))))
    samples = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(samples)


def _event_ms(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float:
    """CUDA events around each call (the fallback when Triton is not installed)."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    count = max(5, min(1000, int(rep_ms / estimate)))
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for begin, stop in pairs:
        begin.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(stop) for begin, stop in pairs)


def device_ms(fn: Callable[[], Any], device: str, rep_ms: float, warmup_ms: float = 20.0) -> float:
    """Median milliseconds per call of ``fn`` on ``device``."""
    if device == "cpu":
        return _cpu_ms(fn, rep_ms)
    try:
        import triton.testing
    except ImportError:
        return _event_ms(fn, warmup_ms, rep_ms)
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def host_us_per_call(fn: Callable[[], Any], device: str, budget_ms: float, repeats: int = 5) -> float:
    """Median µs per call of ``calls`` eager calls without synchronization, then one synchronization."""
    for _ in range(5):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    synchronize(device)
    once = max((time.perf_counter() - t0) / 5, 1e-7)
    calls = max(3, min(5000, int(budget_ms * 1e-3 / repeats / once)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)
