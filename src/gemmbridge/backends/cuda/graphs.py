"""Small products replayed as CUDA graphs.

For a small GEMM the host cost of ``cublasLtMatmul`` itself (about 8 µs on an H100 host) exceeds
the kernel's run time. A graph launch costs less, so when the same plan meets the same pointers,
scalars, stream and workspace a second time (an allocator hands the same addresses back in a
loop), the call is captured once on a private stream and from then on replayed on the caller's
stream. Pointers are baked into a graph, so a graph is only replayed for exactly the call it was
captured from; nothing is captured or replayed while the caller's stream is itself being captured.

``enabled`` (``GEMMBRIDGE_GRAPHS``: "1", the default, or "0"; ``gemmbridge.set_graphs``) switches it, read at
each call: off, nothing is captured (autotune's timing graphs neither) and graphs captured before are not
replayed — every call is launched directly. Why a program turns it off: a capture, even in thread-local mode
on a private stream, makes CUDA refuse a device-wide synchronize from any other thread on that device
(``cudaErrorStreamCaptureUnsupported``: ``torch.cuda.synchronize()``, entering ``torch.cuda.graph``) and
invalidates the capture. gemmbridge then makes its call eagerly; the other thread gets the error.

Graph executables are never destroyed while a capture may be under way on the calling thread (a
destroy inside a capture can invalidate it): ``close`` and the eviction of a graph hand them to
``_doomed``, and ``drain`` destroys them from a call that is known not to be capturing.

Another thread may be capturing meanwhile, in CUDA's global mode (torch's default): then calls
that CUDA deems unsafe during a capture (creating a stream, instantiating or destroying a graph,
waiting for an event) fail, and invalidate that thread's capture. gemmbridge makes them
``isolated``: with this thread's capture interaction mode thread-local, which is sound because
they touch only gemmbridge's own streams, events and graphs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cuda.bindings import driver

from ...errors import OptionError, VendorError

try:  # cuda-bindings >= 13.5: integer-handle entry points with far less Python overhead
    from cuda.bindings._v2.driver import graph_launch as _graph_launch_v2
except ImportError:
    _graph_launch_v2 = None

MAX_FLOPS = 1 << 27  # larger products are kernel-bound: no graphs for them
GRAPHS_PER_PLAN = 4

_setting = os.environ.get("GEMMBRIDGE_GRAPHS", "1")
if _setting not in ("0", "1"):
    raise OptionError(f"GEMMBRIDGE_GRAPHS must be '0' or '1', not {_setting!r}")
enabled = _setting == "1"  # small calls recorded and replayed as graphs (module doc)

_capture_streams: dict[int, Any] = {}
_capture_lock = threading.Lock()  # the capture stream of a device is shared: one capture at a time
_doomed: list[Any] = []  # graph executables to destroy once no capture can be under way


def check(result: tuple, what: str) -> Any:
    """The value of a cuda.bindings driver call, or VendorError naming the call and its status."""
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise VendorError(f"matmul: {what} failed with {result[0]!r}", str(result[0]))
    return result[1] if len(result) > 1 else None


_stream_objects: dict[int, Any] = {}


def _launch(graph: Any, stream: int) -> None:
    """cuGraphLaunch on a raw stream handle."""
    if _graph_launch_v2 is not None:
        try:
            _graph_launch_v2(graph[1], stream)
        except Exception as error:  # the v2 entry points raise on a driver error
            raise VendorError(f"matmul: cuGraphLaunch failed: {error}", str(error)) from error
        return
    wrapped = _stream_objects.get(stream)
    if wrapped is None:
        if len(_stream_objects) > 256:
            _stream_objects.clear()
        wrapped = _stream_objects[stream] = driver.CUstream(stream)
    check(driver.cuGraphLaunch(graph[0], wrapped), "cuGraphLaunch")


@contextlib.contextmanager
def isolated(api: Any = None, relaxed: bool = False) -> Iterator[None]:
    """The block's calls ignore other threads' captures (module doc): this thread's capture interaction mode is
    thread-local meanwhile (``cuThreadExchangeStreamCaptureMode``; ``api``: the driver module, ``driver`` when
    None). The caller's own stream must not be capturing — unless ``relaxed``: the mode is relaxed, which lets the
    calls through during this thread's own capture too (for calls that touch no stream, such as loading a kernel)."""
    api = driver if api is None else api
    modes = api.CUstreamCaptureMode
    mode = modes.CU_STREAM_CAPTURE_MODE_RELAXED if relaxed else modes.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    before = check(api.cuThreadExchangeStreamCaptureMode(mode), "cuThreadExchangeStreamCaptureMode")
    try:
        yield
    finally:
        api.cuThreadExchangeStreamCaptureMode(before)


def drain() -> None:
    """Destroy the graph executables of closed caches and evicted graphs (call only where no capture is under way
    on this thread)."""
    if not _doomed:
        return
    with isolated():
        while True:
            try:
                graph = _doomed.pop()  # atomic: threads draining at once never destroy one twice
            except IndexError:
                return
            driver.cuGraphExecDestroy(graph[0])


def capture(device: int, enqueue: Callable[[int], None]) -> Any:
    """An instantiated graph of what ``enqueue(stream)`` enqueues, captured on the device's private stream and
    uploaded to the device: ``(exec, handle)`` for ``_launch``; the caller destroys it (``cuGraphExecDestroy``)."""
    with _capture_lock, isolated():
        stream = _capture_streams.get(device)
        if stream is None:
            flags = driver.CUstream_flags.CU_STREAM_NON_BLOCKING
            stream = _capture_streams[device] = check(driver.cuStreamCreate(flags), "cuStreamCreate")
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        check(driver.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
        try:
            enqueue(int(stream))
        except BaseException:
            result = driver.cuStreamEndCapture(stream)
            if result[0] == driver.CUresult.CUDA_SUCCESS:
                driver.cuGraphDestroy(result[1])
            raise
        graph = check(driver.cuStreamEndCapture(stream), "cuStreamEndCapture")
        try:
            graph_exec = check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            driver.cuGraphDestroy(graph)
        try:  # uploaded here, isolated: a first launch would upload it, unsafe during another thread's capture
            check(driver.cuGraphUpload(graph_exec, stream), "cuGraphUpload")
        except BaseException:
            driver.cuGraphExecDestroy(graph_exec)
            raise
        return graph_exec, int(graph_exec)


class GraphCache:
    """Per-plan table: call signature → instantiated graph, and the signatures seen once.

    Calls that cycle through more signatures than the table holds would capture a graph on every call
    (a capture costs far more than the call): once ``GRAPHS_PER_PLAN`` graphs in a row were evicted
    without a single replay, the plan records no more graphs (``broken``) and its calls are made
    eagerly. A replayed graph moves to the back of the eviction order.
    """

    __slots__ = ("execs", "replays", "seen", "broken", "wasted", "lock")

    def __init__(self) -> None:
        self.execs: dict[tuple, Any] = {}
        self.replays: dict[tuple, int] = {}  # replays of each graph since its capture
        self.seen: set[tuple] = set()
        self.broken = False
        self.wasted = 0  # graphs evicted in a row without a replay
        self.lock = threading.Lock()

    def replay(self, signature: tuple, stream: int) -> bool:
        """Launch the graph captured for ``signature`` on ``stream``; False when there is none."""
        with self.lock:  # launched under the lock: no thread's record() or close() takes it away meanwhile
            graph = self.execs.get(signature)
            if graph is None:
                return False
            _launch(graph, stream)
            self.replays[signature] += 1
            self.execs[signature] = self.execs.pop(signature)  # the last replayed is the last evicted
        return True

    def record(self, signature: tuple, device: int, stream: int, enqueue: Callable[[int], None]) -> bool:
        """On the second sighting of ``signature``, capture ``enqueue`` and launch it; False: call it eagerly.

        The caller has checked that its stream is not being captured.
        """
        drain()
        with self.lock:  # the whole of it: a graph is captured once, and launched before anyone may evict it
            graph = self.execs.get(signature)  # another thread captured it meanwhile
            if graph is not None:
                _launch(graph, stream)
                self.replays[signature] += 1
                return True
            if self.broken or signature not in self.seen:
                if len(self.seen) >= 4 * GRAPHS_PER_PLAN:
                    self.seen.clear()
                self.seen.add(signature)
                return False
            try:
                graph = self._capture(device, enqueue)
            except Exception:  # this call is still made eagerly (and raises there if it must); no graphs for it
                self.broken = True
                return False
            if len(self.execs) >= GRAPHS_PER_PLAN:
                oldest = next(iter(self.execs))
                _doomed.append(self.execs.pop(oldest))  # destroyed by the next drain (isolated)
                if self.replays.pop(oldest) == 0:
                    self.wasted += 1
                    self.broken = self.wasted >= GRAPHS_PER_PLAN
                else:
                    self.wasted = 0
            self.execs[signature] = graph
            self.replays[signature] = 0
            _launch(graph, stream)
        return True

    def _capture(self, device: int, enqueue: Callable[[int], None]) -> Any:
        return capture(device, enqueue)

    def close(self) -> None:
        """Hand the executables to ``drain`` (the caller may be inside a capture); none is launching then."""
        with self.lock:
            _doomed.extend(self.execs.values())
            self.execs.clear()
            self.replays.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
