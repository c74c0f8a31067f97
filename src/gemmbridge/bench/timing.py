"""Timing: device time per call, host µs per call, and rounds repeated until the best times agree.

GPU: ``triton.testing.do_bench`` (median, warm-up excluded, L2 flushed before each call) when Triton is
installed, else CUDA events around each call with the L2 flushed the same way (a 256 MiB buffer zeroed before
each call; median). CPU: ``time.perf_counter`` around loops of calls
long enough to measure, median of the loops. Candidates are interleaved (A B C A B C ...) and each keeps
its best median, so that clock and thermal drift hit every candidate alike.

Rounds (``settle``): every measurement runs once per round, interleaved, for at least ``rounds`` rounds; one
whose best two times still differ by more than ``max_spread`` (relative: ``spread``) gets further rounds, up to
``max_rounds`` in all. One that never settles is reported as unstable, with its spread.

Host µs per call: N eager calls with no synchronization, then one, divided by N (on the CPU this is the time per
call, so ``gemmbridge bench`` takes it from the timed measurement rather than from a second one).

GPU µs per op (tiny shapes, CUDA only): ``calls`` calls captured into one CUDA graph (torch's, or CuPy's for
CuPy), the graph replayed between two CUDA events; the median replay time over ``calls``. The host is out of
the picture, so this is what each op costs the GPU when launches are free (inside a captured model).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

MAX_SPREAD = 0.05  # a measurement is stable when its best two times lie within 5 % of each other
MAX_ROUNDS = 6  # rounds in all, at most, for a measurement that has not settled


def spread(times: list[float]) -> float | None:
    """How far the second-best time lies above the best, ``(t₂ − t₁) / t₁``; None with fewer than two times."""
    best = sorted(t for t in times if not math.isnan(t))[:2]
    return (best[1] - best[0]) / best[0] if len(best) == 2 and best[0] > 0 else None


def settle(
    names: list[str], measure: Callable[[str], float], rounds: int, max_rounds: int, max_spread: float
) -> dict[str, list[float]]:
    """Each name's times: ``measure(name)`` once per round for every name (interleaved), at least ``rounds``
    rounds, then more rounds for the names whose ``spread`` is over ``max_spread`` (or unknown), up to
    ``max_rounds`` in all. A measurement that returns NaN (it failed) is not repeated."""
    times: dict[str, list[float]] = {name: [] for name in names}

    def settled(got: list[float]) -> bool:
        found = spread(got)
        return found is not None and found <= max_spread

    for done in range(max(rounds, max_rounds)):
        pending = [
            name
            for name, got in times.items()
            if not (got and math.isnan(got[-1])) and (done < rounds or not settled(got))
        ]
        if not pending:
            break
        for name in pending:
            times[name].append(measure(name))
    return times


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


L2_FLUSH_BYTES = 256 << 20  # zeroed before each timed call: more than any L2 (do_bench's size)


def _events(count: int) -> list[tuple[Any, Any]]:
    import torch

    return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]


def _median_ms(fn: Callable[[], Any], pairs: list[tuple[Any, Any]], before: Callable[[], Any] | None = None) -> float:
    """Median ms of ``fn`` between each pair of CUDA events (``before`` runs outside them, e.g. an L2 flush)."""
    import torch

    for begin, stop in pairs:
        if before is not None:
            before()
        begin.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(stop) for begin, stop in pairs)


def _event_ms(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float:
    """CUDA events around each call, the L2 flushed before each (the fallback when Triton is not installed)."""
    import torch

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda").zero_
    fn()
    torch.cuda.synchronize()
    estimate = max(_median_ms(fn, _events(5), flush), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    return _median_ms(fn, _events(max(5, min(1000, int(rep_ms / estimate)))), flush)


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


GRAPH_CALLS, GRAPH_REPLAYS = 100, 20  # GPU µs per op: calls captured in one graph, timed replays of it


def _torch_graph(fn: Callable[[], Any], calls: int) -> Callable[[], Any]:
    """``calls`` calls of ``fn`` captured into a torch CUDA graph (warmed up on a side stream first, as torch
    asks); returns its replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def _cupy_graph(fn: Callable[[], Any], calls: int) -> Callable[[], Any]:
    """``calls`` calls of ``fn`` (CuPy work on CuPy's current stream) captured into a CuPy graph; returns a
    launch of it on torch's current stream, where the timing events are recorded. The graph writes into blocks
    CuPy's pool has taken back: it is replayed only at once, before anything else allocates, then dropped."""
    import cupy
    import torch

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.begin_capture()
        try:
            for _ in range(calls):
                fn()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.end_capture()
            raise
        graph = stream.end_capture()
    target = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    return lambda: graph.launch(target)


def gpu_us_per_op(fn: Callable[[], Any], graph: str, calls: int = GRAPH_CALLS, replays: int = GRAPH_REPLAYS) -> float:
    """GPU µs per call of ``fn``: ``calls`` calls captured into one CUDA graph (``graph``: ``torch`` or ``cupy``,
    who captures), the median of ``replays`` event-timed replays divided by ``calls``."""
    replay = (_torch_graph if graph == "torch" else _cupy_graph)(fn, calls)
    replay()
    return _median_ms(replay, _events(replays)) / calls * 1e3
