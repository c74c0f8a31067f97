"""Timing candidates on the caller's stream with CUDA events, into scratch outputs, at steady clocks.

``Timer`` measures a candidate's ms per call: one call not timed, a short estimate, then about
``MEASURE_MS`` of calls (3 to 200), one wait for the GPU per measurement. ``warm`` runs the first
pick until the clocks are steady before anything is compared (``autotune`` says why). Every wait,
and the graph work of timing host-bound candidates, is isolated from other threads' captures
(``graphs.isolated``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cuda.bindings import driver

from ...errors import GemmError
from ...problem import Operands
from . import graphs
from .graphs import check

if TYPE_CHECKING:
    from .autotune import Candidate

MEASURE_MS = 2.0  # GPU time to spend timing each candidate (at least 3 calls, at most 200)
WARMUP_MS = 500.0  # the warm-up runs at least this much GPU time (a boost clock may hold for a while)...
WARMUP_CHUNK_MS = 50.0  # ...in chunks of this much (at most 200 calls each)...
WARMUP_CHUNKS = 20  # ...at most this many, until two in a row agree within SETTLED
SETTLED = 0.01
GRAPH_BELOW_MS = 0.05  # per-call times below this are measured again as CUDA-graph replays
GRAPH_LAUNCHES = 20


class Timer:
    """CUDA-event timing of candidates on one stream, into scratch outputs (``ptrs``).

    A candidate faster than ``GRAPH_BELOW_MS`` per call is host-bound when launched call by call (the
    host's launch rate, not the kernel, would be measured): it is timed as replays of a CUDA graph of
    ``GRAPH_LAUNCHES`` calls, captured once on a private stream (``graphs``) and destroyed on exit — unless
    graphs are off (``graphs.enabled``): then every call is launched by itself, and so timed. The waits for the
    GPU are isolated from other threads' captures (``graphs.isolated``)."""

    def __init__(self, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int, device: int) -> None:
        self.args = (ptrs, alpha, beta, workspace, stream)
        self.stream, self.device = stream, device
        self._held = contextlib.ExitStack()
        self._graphs: dict[int, Any] = {}  # id(candidate) → its graph of GRAPH_LAUNCHES calls

    def __enter__(self) -> Timer:
        held = self._held
        held.enter_context(graphs.isolated(driver))
        try:
            self.start = check(driver.cuEventCreate(0), "cuEventCreate")
            held.callback(driver.cuEventDestroy, self.start)
            self.end = check(driver.cuEventCreate(0), "cuEventCreate")
            held.callback(driver.cuEventDestroy, self.end)
        except BaseException:  # no __exit__ follows: the thread's capture mode is restored here, not when collected
            held.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def _per_call(self, enqueue: Callable[[], None], budget_ms: float) -> float:
        """ms per ``enqueue()``: a short estimate, then about ``budget_ms`` worth of calls (3 to 200)."""
        repeats = 3
        for _ in range(2):
            check(driver.cuEventRecord(self.start, self.stream), "cuEventRecord")
            for _ in range(repeats):
                enqueue()
            check(driver.cuEventRecord(self.end, self.stream), "cuEventRecord")
            check(driver.cuEventSynchronize(self.end), "cuEventSynchronize")
            per_call = check(driver.cuEventElapsedTime(self.start, self.end), "cuEventElapsedTime") / repeats
            repeats = max(3, min(200, int(budget_ms / max(per_call, 1e-3))))
        return float(per_call)

    def warm(self, candidate: Candidate) -> None:
        """Run ``candidate`` in chunks of about ``WARMUP_CHUNK_MS`` until two chunks in a row agree within ``SETTLED``
        and ``WARMUP_MS`` of GPU time has passed (at most ``WARMUP_CHUNKS``): the clocks are steady. A problem too
        small to fill a chunk with 200 calls does not load the GPU: agreement is enough. A failing candidate is
        left at once."""
        last, spent = float("inf"), 0.0
        for _ in range(WARMUP_CHUNKS):
            now = self.time(candidate, WARMUP_CHUNK_MS)
            if now == float("inf"):
                return
            chunk = min(WARMUP_CHUNK_MS, 200 * now)
            spent += chunk
            if abs(now - last) <= SETTLED * now and (spent >= WARMUP_MS or chunk < WARMUP_CHUNK_MS):
                return
            last = now

    def time(self, candidate: Candidate, budget_ms: float = MEASURE_MS) -> float:
        """``candidate``'s ms per call (after a call not timed); inf if it fails."""
        launch, (ptrs, alpha, beta, workspace, stream) = candidate.launch, self.args
        graph = self._graphs.get(id(candidate))
        if graph is not None:
            return self._per_call(lambda: graphs._launch(graph, stream), budget_ms) / GRAPH_LAUNCHES
        try:
            launch(ptrs, alpha, beta, workspace, stream)
        except GemmError:
            return float("inf")
        per_call = self._per_call(lambda: launch(ptrs, alpha, beta, workspace, stream), budget_ms)
        if per_call >= GRAPH_BELOW_MS or not graphs.enabled:  # graphs off: the calls are launched one by one
            return per_call

        def calls(on: int) -> None:
            for _ in range(GRAPH_LAUNCHES):
                launch(ptrs, alpha, beta, workspace, on)

        try:
            graph = self._graphs[id(candidate)] = graphs.capture(self.device, calls)
        except GemmError:
            return per_call
        self._held.callback(driver.cuGraphExecDestroy, graph[0])
        return self.time(candidate, budget_ms)
