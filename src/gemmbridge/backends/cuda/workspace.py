"""cuBLASLt workspace: one buffer per (device, stream), never shared by two streams.

Each buffer is allocated by the caller's framework while that stream is
current, so its allocator orders reuse after the stream's work. The table is
bounded; the oldest entry is dropped first.
"""

from __future__ import annotations

from typing import Any

from ...arrays import ArrayAdapter
from .bindings import WORKSPACE_BYTES

MAX_STREAMS = 64
_buffers: dict[tuple[str, int, int], tuple[Any, int]] = {}


def pointer(fw: ArrayAdapter, device: int, stream: int, like: Any) -> int:
    """Address of the workspace for ``stream`` on ``device``."""
    key = (fw.name, device, stream)
    entry = _buffers.get(key)
    if entry is None:
        if len(_buffers) >= MAX_STREAMS:
            _buffers.pop(next(iter(_buffers)))
        entry = _buffers[key] = fw.workspace(WORKSPACE_BYTES, like)
    return entry[1]


def count() -> int:
    return len(_buffers)
