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


def test_other_streams_have_their_own_and_the_table_is_bounded():
    first = address(Ctx(100))
    assert address(Ctx(101)) != first
    for stream in range(200, 200 + workspace.MAX_STREAMS):
        address(Ctx(stream))
    assert len(workspace._buffers) == workspace.MAX_STREAMS
    assert address(Ctx(100)) != first  # dropped (safe outside captures) and made again


def test_each_capture_gets_its_own_workspace_that_outlives_stream_eviction(monkeypatch):
    """Two graphs captured on one stream must not share a workspace; evicting streams never frees a captured one."""
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
    assert (0, 50, 8) in workspace._captures  # not evicted by the stream table
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
