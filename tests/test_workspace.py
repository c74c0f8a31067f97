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


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace, "_buffers", {})
    monkeypatch.setattr(workspace, "_captures", {})
    monkeypatch.setattr(workspace, "_kept", [])
    monkeypatch.setattr(workspace, "_per_thread", threading.local())


def in_thread(fn):  # type: ignore[no-untyped-def]
    found = []
    t = threading.Thread(target=lambda: found.append(fn()))
    t.start()
    t.join()
    return found[0]


def test_the_legacy_default_stream_has_one_workspace_for_every_thread():
    here = workspace.pointer(View(), Ctx(0))
    assert in_thread(lambda: workspace.pointer(View(), Ctx(0))) == here
    assert workspace.pointer(View(), Ctx(1)) == here  # cudaStreamLegacy is the same stream
    assert workspace.pointer(View(), Ctx(0, device=1)) != here


def test_the_per_thread_default_stream_has_one_workspace_per_thread():
    here = workspace.pointer(View(), Ctx(2))
    assert workspace.pointer(View(), Ctx(2)) == here
    assert in_thread(lambda: workspace.pointer(View(), Ctx(2))) != here


def test_other_streams_have_their_own_and_the_table_is_bounded():
    first = workspace.pointer(View(), Ctx(100))
    assert workspace.pointer(View(), Ctx(101)) != first
    for stream in range(200, 200 + workspace.MAX_STREAMS):
        workspace.pointer(View(), Ctx(stream))
    assert len(workspace._buffers) == workspace.MAX_STREAMS
    assert workspace.pointer(View(), Ctx(100)) != first  # dropped (safe outside captures) and made again


def test_each_capture_gets_its_own_workspace_that_outlives_stream_eviction(monkeypatch):
    """Two graphs captured on one stream must not share a workspace; evicting streams never frees a captured one."""
    capture = {"id": 7}
    monkeypatch.setattr(workspace, "capture_id", lambda stream: capture["id"])
    plain = workspace.pointer(View(), Ctx(50))
    first = workspace.pointer(View(), Ctx(50, capturing=True))
    assert first != plain and workspace.pointer(View(), Ctx(50, capturing=True)) == first  # one per capture
    capture["id"] = 8  # capture 7 ended; a new capture on the same stream
    second = workspace.pointer(View(), Ctx(50, capturing=True))
    assert second not in (first, plain)
    for stream in range(300, 300 + 2 * workspace.MAX_STREAMS):
        workspace.pointer(View(), Ctx(stream))
    assert (0, 50, 8) in workspace._captures  # not evicted by the stream table


def test_captured_workspaces_are_kept_where_the_framework_does_not_tie_memory_to_the_graph(monkeypatch):
    capture = {"id": 1}
    monkeypatch.setattr(workspace, "capture_id", lambda stream: capture["id"])
    torch_like = Ctx(60, capturing=True, graph_owns_memory=True)
    workspace.pointer(View(), torch_like)
    cupy_like = Ctx(61, capturing=True, graph_owns_memory=False)
    workspace.pointer(View(), cupy_like)
    capture["id"] = None  # every capture has ended
    workspace.release_finished_captures()
    assert workspace._captures == {}
    assert workspace._kept == cupy_like.made  # torch's graph pool keeps its own; cupy's is kept for good
