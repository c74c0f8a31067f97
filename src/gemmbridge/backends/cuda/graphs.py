"""Small products replayed as CUDA graphs.

For a small GEMM the host cost of ``cublasLtMatmul`` itself (about 8 µs on an
H100 host) exceeds the kernel's run time. A graph launch costs less, so when the
same plan meets the same pointers, scalars and stream a second time (an
allocator hands the same addresses back in a loop), the call is captured once
on a private stream and from then on replayed on the caller's stream. Pointers
are baked into a graph, so a graph is only replayed for exactly the pointers it
was captured with; nothing is replayed while the caller's stream is itself
being captured.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cuda.bindings import driver

from ...arrays import ArrayAdapter

try:  # cuda-bindings >= 13.5: integer-handle entry points with far less Python overhead
    from cuda.bindings._v2.driver import graph_launch as _graph_launch_v2
except ImportError:
    _graph_launch_v2 = None

MAX_FLOPS = 1 << 27  # larger products are kernel-bound: no graphs for them
GRAPHS_PER_PLAN = 4

_capture_streams: dict[int, Any] = {}
_capture_lock = threading.Lock()  # the capture stream of a device is shared: one capture at a time


def _check(result: tuple) -> Any:
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {result[0]!r}")
    return result[1] if len(result) > 1 else None


_stream_objects: dict[int, Any] = {}


def _launch(graph: Any, stream: int) -> None:
    """cuGraphLaunch on a raw stream handle; raises on a driver error."""
    if _graph_launch_v2 is not None:
        _graph_launch_v2(graph[1], stream)
        return
    wrapped = _stream_objects.get(stream)
    if wrapped is None:
        if len(_stream_objects) > 256:
            _stream_objects.clear()
        wrapped = _stream_objects[stream] = driver.CUstream(stream)
    _check(driver.cuGraphLaunch(graph[0], wrapped))


class GraphCache:
    """Per-plan table: call signature → instantiated graph, and the signatures seen once."""

    __slots__ = ("execs", "seen", "broken")

    def __init__(self) -> None:
        self.execs: dict[tuple, Any] = {}
        self.seen: set[tuple] = set()
        self.broken = False

    def launch(
        self, signature: tuple, fw: ArrayAdapter, device: int, stream: int, enqueue: Callable[[int], None]
    ) -> bool:
        """Replay (or capture, on the second sighting) ``enqueue``; False means: call it eagerly."""
        graph = self.execs.get(signature)
        if graph is not None:
            if fw.capturing(device):
                return False
            _launch(graph, stream)
            return True
        if self.broken or signature not in self.seen:
            if len(self.seen) >= 4 * GRAPHS_PER_PLAN:
                self.seen.clear()
            self.seen.add(signature)
            return False
        if fw.capturing(device):
            return False
        try:
            graph = self._capture(device, enqueue)
        except Exception:  # this call is still made eagerly (and raises there if it must); no graphs for it
            self.broken = True
            return False
        if graph is None:
            return False
        if len(self.execs) >= GRAPHS_PER_PLAN:
            old = self.execs.pop(next(iter(self.execs)))
            driver.cuGraphExecDestroy(old[0])
        self.execs[signature] = graph
        _launch(graph, stream)
        return True

    def _capture(self, device: int, enqueue: Callable[[int], None]) -> Any:
        with _capture_lock:
            stream = _capture_streams.get(device)
            if stream is None:
                flags = driver.CUstream_flags.CU_STREAM_NON_BLOCKING
                stream = _capture_streams[device] = _check(driver.cuStreamCreate(flags))
            mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
            _check(driver.cuStreamBeginCapture(stream, mode))
            try:
                enqueue(int(stream))
            except BaseException:
                result = driver.cuStreamEndCapture(stream)
                if result[0] == driver.CUresult.CUDA_SUCCESS:
                    driver.cuGraphDestroy(result[1])
                raise
            graph = _check(driver.cuStreamEndCapture(stream))
        try:
            graph_exec = _check(driver.cuGraphInstantiate(graph, 0))
            return graph_exec, int(graph_exec)
        except RuntimeError:
            self.broken = True
            return None
        finally:
            driver.cuGraphDestroy(graph)

    def close(self) -> None:
        for graph in self.execs.values():
            driver.cuGraphExecDestroy(graph[0])
        self.execs.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may be gone already
            pass
