"""The cuBLASLt workspace policy (``backends/cuda/workspace.py``), checked without a GPU."""

from __future__ import annotations

import itertools
import threading

import pytest

pytest.importorskip("cuda.bindings.driver")

from gemmbridge.backends.cuda import workspace  # noqa: E402


class Buffer:
    addresses = itertools.count(1 << 20, 1 << 25)

    def __init__(self) -> None:
        self.address = next(Buffer.addresses)


class View:
    def pointer(self, x: Buffer) -> int:
        return x.address


class Ctx:
    def __init__(self, stream: int, capturing: bool = False, graph_owns_memory: bool = True, device: int = 0) -> None:
        self.device, self.stream, self.capturing, self.graph_owns_memory = device, stream, capturing, graph_owns_memory
        self.made: list[Buffer] = []

    def empty(self, shape: tuple[int, ...], dtype: str) -> Buffer:
        assert shape == (workspace.WORKSPACE_BYTES,) and dtype == "uint8"
        self.made.append(Buffer())
        return self.made[-1]


def own(ctx: Ctx) -> tuple[Buffer, int]:
    """What cuMemAllocAsync gives outside captures, recorded like the framework's allocations."""
    ctx.made.append(Buffer())
    return ctx.made[-1], ctx.made[-1].address


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace, "_own", own)
    monkeypatch.setattr(workspace, "_buffers", {})
    monkeypatch.setattr(workspace, "_streams_kept", {})
    monkeypatch.setattr(workspace, "_captures", {})
    monkeypatch.setattr(workspace, "_kept", [])
    monkeypatch.setattr(workspace, "_per_thread", threading.local())


def address(ctx: Ctx) -> int:
    return workspace.pointer(View(), ctx)[1]


def in_thread(fn):  # type: ignore[no-untyped-def]
    found = []
    t = threading.Thread(target=lambda: found.append(fn()))
    t.start()
    t.join()
    return found[0]


def test_the_legacy_default_stream_has_one_workspace_for_every_thread():
    here = address(Ctx(0))
    assert in_thread(lambda: address(Ctx(0))) == here
    assert address(Ctx(1)) == here  # cudaStreamLegacy is the same stream
    assert address(Ctx(0, device=1)) != here


def test_the_per_thread_default_stream_has_one_workspace_per_thread():
    here = address(Ctx(2))
    assert address(Ctx(2)) == here
    assert in_thread(lambda: address(Ctx(2))) != here


def test_the_first_streams_keep_theirs_and_further_streams_take_one_per_call():
    first = address(Ctx(100))
    assert address(Ctx(101)) != first and address(Ctx(100)) == first
    for stream in range(200, 200 + workspace.MAX_STREAMS):
        address(Ctx(stream))
    assert len(workspace._buffers) == workspace.MAX_STREAMS and address(Ctx(100)) == first  # kept, never evicted
    late = Ctx(999)
    assert address(late) != address(late) and len(late.made) == 2  # one per call: the call frees its own
    assert address(Ctx(0)) == address(Ctx(1))  # the legacy stream is not counted among them
    assert address(Ctx(300, device=1)) not in {b.address for b in late.made}  # another device has its own table
    assert len(workspace._buffers) == workspace.MAX_STREAMS + 2


class StreamOrderedPool:
    """cuMemAllocAsync / cuMemFreeAsync of cuda.bindings.driver, with the streams each thread is on, the streams
    under capture (in CUDA's global mode) and each thread's capture interaction mode: ``misplaced`` lists every free
    into a stream other than the freeing thread's own or into a stream being captured (it would land in another
    thread's capture, fail and invalidate it), and every allocation or free made in the global mode while another
    thread captures (the pool may grow or shrink: CUDA refuses it and invalidates that capture)."""

    def __init__(self) -> None:
        from cuda.bindings import driver

        self.CUresult, self.ok = driver.CUresult, driver.CUresult.CUDA_SUCCESS
        self.CUstreamCaptureMode = driver.CUstreamCaptureMode
        self.addresses = itertools.count(1 << 30, 1 << 25)
        self.on = threading.local()  # the stream this thread is calling on, and its capture interaction mode
        self.capturing: set[int] = set()
        self.allocated: dict[int, int] = {}  # address → stream
        self.misplaced: list[str] = []
        self.lock = threading.Lock()

    @staticmethod
    def CUstream(handle: int) -> int:
        return handle

    def cuThreadExchangeStreamCaptureMode(self, mode: object) -> tuple:
        before = getattr(self.on, "mode", self.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL)
        self.on.mode = mode
        return self.ok, before

    def _exposed(self, what: str) -> None:
        """Record ``what`` when this thread's mode is global while another thread's stream is being captured."""
        mine = getattr(self.on, "stream", None)
        if getattr(self.on, "mode", None) == self.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL:
            return
        if self.capturing - {mine}:
            self.misplaced.append(f"{what} on stream {mine} in the global mode during another thread's capture")

    def cuMemAllocAsync(self, size: int, stream: int) -> tuple:
        address = next(self.addresses)
        with self.lock:
            self._exposed("cuMemAllocAsync")
            self.allocated[address] = stream
        return self.ok, address

    def cuMemFreeAsync(self, address: int, stream: int) -> tuple:
        mine = getattr(self.on, "stream", None)
        with self.lock:
            self._exposed("cuMemFreeAsync")
            if stream != mine or stream in self.capturing or self.allocated.pop(address) != stream:
                self.misplaced.append(f"{address:#x} freed into stream {stream} by a thread on stream {mine}")
        return (self.ok,)


def test_no_call_frees_into_a_stream_of_another_thread_or_under_capture(monkeypatch):
    """64 threads, each on its own stream, call again and again while others capture theirs. A workspace evicted
    from a full table was freed into its own stream by whichever thread evicted it, while that stream's thread could
    be capturing: 2 of 64 captures failed so on an H200. Now each call allocates and frees only on its own stream,
    and in the thread-local capture mode (``graphs.isolated``): another thread's global capture is left alone."""
    from gemmbridge.backends.cuda.workspace import DeviceBuffer

    pool = StreamOrderedPool()
    monkeypatch.setattr(workspace, "driver", pool)
    monkeypatch.setattr(workspace, "_own", lambda ctx: (lambda buf: (buf, buf.address))(DeviceBuffer(ctx.stream)))
    start = threading.Barrier(64)

    def work(stream: int) -> None:
        pool.on.stream = stream
        start.wait()
        for i in range(20):
            if i % 4 == 2:
                with pool.lock:
                    pool.capturing.add(stream)  # this thread captures now: a call on its stream takes the graph's
                address(Ctx(stream, capturing=True))
                with pool.lock:
                    pool.capturing.discard(stream)
            else:
                held = workspace.pointer(View(), Ctx(stream))
                del held  # as cuda.run drops it once the call is enqueued

    threads = [threading.Thread(target=work, args=(100 + i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.misplaced == []
    kept = {key[1] for key in workspace._buffers}
    assert len(kept) == workspace.MAX_STREAMS and set(pool.allocated.values()) == kept  # the rest were all freed


def test_each_capture_gets_its_own_workspace_that_outlives_its_capture(monkeypatch):
    """Two graphs captured on one stream must not share a workspace; filling the stream table never frees one."""
    capture = {"id": 7}
    monkeypatch.setattr(workspace, "capture_id", lambda stream: capture["id"])
    plain = address(Ctx(50, graph_owns_memory=False))
    first = address(Ctx(50, capturing=True, graph_owns_memory=False))
    assert first != plain and address(Ctx(50, capturing=True, graph_owns_memory=False)) == first  # one per capture
    capture["id"] = 8  # capture 7 ended; a new capture on the same stream
    second = address(Ctx(50, capturing=True, graph_owns_memory=False))
    assert second not in (first, plain)
    for stream in range(300, 300 + 2 * workspace.MAX_STREAMS):
        address(Ctx(stream))
    assert (0, 50, 8) in workspace._captures  # not dropped by the stream table
    workspace.release_finished_captures()
    assert len(workspace._kept) == 2  # both kept for good: their graphs may replay at any time


def test_with_graph_owned_memory_each_captured_call_takes_its_own_and_holds_nothing(monkeypatch):
    """torch: the graph's private pool keeps the workspace alive; gemmbridge holding it would break CUDA graph
    trees (they refuse live allocations in their pool that no output tracks)."""
    monkeypatch.setattr(workspace, "capture_id", lambda stream: pytest.fail("no capture bookkeeping needed"))
    ctx = Ctx(60, capturing=True, graph_owns_memory=True)
    held, first = workspace.pointer(View(), ctx)
    assert held is ctx.made[-1] and address(ctx) != first and len(ctx.made) == 2
    assert workspace._captures == {} and workspace._kept == []


@pytest.mark.parametrize("kept", [True, False], ids=["first_buffer_of_a_kept_stream", "per_call_beyond_the_table"])
def test_workspaces_are_made_and_freed_without_touching_another_threads_global_capture(kept, monkeypatch):
    """While another thread captures stream 999 in CUDA's global mode, a call on a stream of this thread makes its
    workspace — kept for the stream, or this call's alone once the table is full — and drops it. Made in the global
    mode, the allocation and the free were refused and invalidated that capture (an H200 GPU run: a tuning thread
    beside a global capture); they are made in the thread-local mode."""
    from gemmbridge.backends.cuda.workspace import DeviceBuffer

    pool = StreamOrderedPool()
    monkeypatch.setattr(workspace, "driver", pool)
    monkeypatch.setattr(workspace, "_own", lambda ctx: (lambda buf: (buf, buf.address))(DeviceBuffer(ctx.stream)))
    monkeypatch.setattr(workspace, "MAX_STREAMS", workspace.MAX_STREAMS if kept else 0)
    pool.on.stream = 40
    pool.capturing.add(999)
    held = workspace.pointer(View(), Ctx(40))
    del held
    assert pool.misplaced == []
    assert pool.on.mode == pool.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL  # the thread's mode restored
    assert len(pool.allocated) == (1 if kept else 0)
