"""cuBLASLt workspace: one buffer per (device, stream), never shared by two streams.

Each buffer is allocated by the caller's framework while that stream is
current, so its allocator orders reuse after the stream's work. The table is
bounded; the oldest entry is dropped first.
"""

from __future__ import annotations

import threading
from typing import Any

from ...arrays import ArrayAdapter
from .bindings import WORKSPACE_BYTES

MAX_STREAMS = 64
_buffers: dict[tuple[str, int, int, int], tuple[Any, int]] = {}
_lock = threading.Lock()


def pointer(fw: ArrayAdapter, device: int, stream: int, like: Any) -> int:
    """Address of the workspace for ``stream`` on ``device``.

    Handles 0, 1 and 2 (the legacy and per-thread default streams) name a different stream in
    each thread, so their workspaces are per thread too.
    """
    key = (fw.name, device, stream, threading.get_ident() if stream <= 2 else 0)
    entry = _buffers.get(key)
    if entry is None:
        with _lock:
            entry = _buffers.get(key)
            if entry is None:
                if len(_buffers) >= MAX_STREAMS:
                    _buffers.pop(next(iter(_buffers)))
                entry = _buffers[key] = fw.workspace(WORKSPACE_BYTES, like)
    return entry[1]


def count() -> int:
    return len(_buffers)
