"""cuBLASLt workspaces: stream-ordered, never shared by two streams that can run at once, and allocated and freed
only on the calling stream.

Policy (each buffer is ``WORKSPACE_BYTES``):

- the legacy default stream (handle 0 or 1): one per device, shared by every thread, since all
  work on it is serialized;
- the per-thread default stream (handle 2): one per thread and device, freed with the thread;
- any other stream: the first ``MAX_STREAMS`` streams a device meets keep one each for the life of
  the process; a call on any further stream takes its own from CUDA's stream-ordered pool on its
  stream and frees it there once the call is enqueued (a few µs: the pool hands the same memory
  back to the next call on that stream);
- a stream being captured into a CUDA graph: allocated by the caller's framework inside the
  capture. It must live as long as the graph can replay, and two graphs must not share one (they
  may be replayed at once on different streams). PyTorch allocates it from the graph's private
  memory pool, which lives as long as the graph, so each call takes one and lets it go after
  enqueueing (holding it would also break torch.compile's CUDA graph trees, which refuse
  untracked live allocations in their pool). Frameworks without graph-owned memory get one per
  capture and stream, kept for the life of the process.

No workspace is ever evicted: a kept buffer can only be freed into its own stream (the free must
follow the work queued there), and at that moment another thread may be capturing that stream —
a free enqueued into someone else's capture fails and invalidates it (2 of 64 threads, each
capturing on its own stream, failed so on an H200 while the table evicted). Asking first does not
help: the owner may begin its capture between the question and the free. So every allocation and
free here is on the calling stream, which the caller has just found not capturing.

Outside captures the buffers come from CUDA's stream-ordered allocator (``cuMemAllocAsync`` on the
stream, ``cuMemFreeAsync`` on it when dropped), not from the caller's framework: a buffer made while
torch.compile's CUDA graph trees warm up would otherwise land in their memory pool, which refuses
allocations held past the warm-up. They are not counted in the framework's memory statistics.

Memory: outside captures at most ``MAX_STREAMS`` + one per device + one per thread that uses a
per-thread default stream + one per call in flight on further streams.
"""

from __future__ import annotations

import threading
from typing import Any

from cuda.bindings import driver

from ...arrays import CallContext, TensorView
from .bindings import WORKSPACE_BYTES
from .graphs import check, isolated

MAX_STREAMS = 16
_LEGACY = (0, 1)
_PER_THREAD = 2

_buffers: dict[tuple[int, int], tuple[Any, int]] = {}  # (device, stream) → (buffer, address)
_streams_kept: dict[int, int] = {}  # device → streams other than the legacy one with a buffer in ``_buffers``
_per_thread = threading.local()
_captures: dict[tuple[int, int, int], tuple[Any, int]] = {}  # (device, stream, capture id) → (buffer, address)
_kept: list[Any] = []  # capture workspaces of frameworks without graph-owned memory, for good
_lock = threading.Lock()


class DeviceBuffer:
    """``WORKSPACE_BYTES`` from the device's stream-ordered pool, freed into the same stream when dropped (never a
    synchronous ``cuMemFree``: that would wait for the device, which another thread's capture forbids). Both are
    ``isolated``: the pool may grow or shrink, which CUDA deems unsafe while another thread captures in its global
    mode — made so, the call would fail and invalidate that capture."""

    __slots__ = ("address", "stream")

    def __init__(self, stream: int) -> None:
        self.stream = driver.CUstream(stream)
        with isolated(driver):
            self.address = int(check(driver.cuMemAllocAsync(WORKSPACE_BYTES, self.stream), "cuMemAllocAsync"))

    def __del__(self) -> None:
        try:
            with isolated(driver):
                driver.cuMemFreeAsync(self.address, self.stream)
        except Exception:  # interpreter shutdown
            pass


def _own(ctx: CallContext) -> tuple[Any, int]:
    buf = DeviceBuffer(ctx.stream)
    return buf, buf.address


def _allocate(view: TensorView, ctx: CallContext) -> tuple[Any, int]:
    """A buffer from the caller's framework (inside captures)."""
    buf = ctx.empty((WORKSPACE_BYTES,), "uint8")
    return buf, view.pointer(buf)


def pointer(view: TensorView, ctx: CallContext) -> tuple[Any, int]:
    """The workspace for the call's stream (module doc) and its address; hold the first until the call
    is enqueued."""
    if ctx.capturing:
        return _capture_pointer(view, ctx)
    stream = ctx.stream
    if stream == _PER_THREAD:
        table = getattr(_per_thread, "buffers", None)
        if table is None:
            table = _per_thread.buffers = {}
        entry = table.get(ctx.device)
        if entry is None:
            entry = table[ctx.device] = _own(ctx)
        return entry
    legacy = stream in _LEGACY
    key = (ctx.device, 0 if legacy else stream)
    entry = _buffers.get(key)
    if entry is None:
        with _lock:
            entry = _buffers.get(key)
            if entry is None:
                kept = _streams_kept.get(ctx.device, 0)
                if not legacy and kept >= MAX_STREAMS:
                    return _own(ctx)  # this call's alone, freed into its stream when the caller drops it
                entry = _buffers[key] = _own(ctx)
                if not legacy:
                    _streams_kept[ctx.device] = kept + 1
    return entry


def capture_id(stream: int) -> int | None:
    """The id of the capture under way on ``stream``, or None."""
    result = driver.cuStreamGetCaptureInfo(driver.CUstream(stream))
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        return None
    if result[1] != driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE:
        return None
    return int(result[2])


def _capture_pointer(view: TensorView, ctx: CallContext) -> tuple[Any, int]:
    if ctx.graph_owns_memory:
        return _allocate(view, ctx)
    capture = capture_id(ctx.stream)
    key = (ctx.device, ctx.stream, -1 if capture is None else capture)
    with _lock:
        entry = _captures.get(key)
        if entry is None:
            _release_finished()
            entry = _captures[key] = _allocate(view, ctx)
            _kept.append(entry[0])
    return entry


def release_finished_captures() -> None:
    """Forget the captures that have ended (their workspaces stay in ``_kept``)."""
    with _lock:
        _release_finished()


def _release_finished() -> None:
    for key in list(_captures):
        if capture_id(key[1]) != key[2]:
            del _captures[key]


def count() -> int:
    """Workspaces held outside captures by the process (the per-thread ones of this thread included)."""
    return len(_buffers) + len(getattr(_per_thread, "buffers", {}))
