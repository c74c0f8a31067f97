"""The emulated GPU's memory: every allocation fenced by guard bytes, every access of an emulated launch bounded.

``MEMORY.allocate(nbytes)`` gives a 256-byte aligned uint8 array (GPU allocators align so) with guard bytes of a
fixed random pattern on both sides. The emulated launches (``cublaslt_emulator``, ``kernel_emulator``) reach device
memory only through ``device(address, dtype, count)``, which refuses a range that is not inside one live allocation
(an out-of-bounds read or write, stopped before it happens), and call ``MEMORY.check()`` after every launch, which
refuses a changed guard byte (a write past an allocation by any other path).

Each fault raises ``AssertionError`` where it is found and is also kept in ``MEMORY.faults``; the suite takes them
after every test (``conftest``), so that a fault raised where gemmbridge sets an error aside (a tuning candidate
that fails is only skipped) still fails the test that made it.
"""

from __future__ import annotations

import ctypes
import math
import threading
import weakref
from typing import Any

import numpy as np

ALIGNMENT = 256  # bytes: what cudaMalloc and the stream-ordered allocator guarantee
GUARD = 512  # bytes of pattern on each side of an allocation (at least; the alignment padding is guarded too)
_PATTERN = np.random.default_rng(0x6E57).integers(0, 256, GUARD + ALIGNMENT, dtype=np.uint8)


class DeviceMemory:
    """The live allocations (by address, held weakly) and the faults found since they were last taken."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[weakref.ref, int, int]] = {}  # user address → (buffer, its offset, size)
        self._lock = threading.Lock()
        self.faults: list[str] = []

    def allocate(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of device memory (uint8, 256-byte aligned, uninitialised) between two guards."""
        buffer = np.empty(GUARD + ALIGNMENT + nbytes + GUARD, np.uint8)
        offset = GUARD + (-(buffer.ctypes.data + GUARD)) % ALIGNMENT
        tail = buffer.size - offset - nbytes
        buffer[:offset] = _PATTERN[:offset]
        buffer[offset + nbytes :] = _PATTERN[:tail]
        address = buffer.ctypes.data + offset
        with self._lock:
            self._live[address] = (weakref.ref(buffer), offset, nbytes)
        return buffer[offset : offset + nbytes]

    def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-ordered array of ``shape`` and ``dtype`` in a fresh allocation."""
        dtype = np.dtype(dtype)
        return self.allocate(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)

    def _entries(self) -> list[tuple[int, np.ndarray, int, int]]:
        """(address, buffer, offset, size) of every live allocation; the freed ones forgotten."""
        found = []
        with self._lock:
            for address, (ref, offset, size) in list(self._live.items()):
                buffer = ref()
                if buffer is None:
                    del self._live[address]
                else:
                    found.append((address, buffer, offset, size))
        return found

    def fault(self, message: str) -> None:
        self.faults.append(message)
        raise AssertionError(message)

    def check(self) -> None:
        """Refuse any changed guard byte (a write outside its allocation)."""
        for address, buffer, offset, size in self._entries():
            before = int(np.count_nonzero(buffer[:offset] != _PATTERN[:offset]))
            after = int(np.count_nonzero(buffer[offset + size :] != _PATTERN[: buffer.size - offset - size]))
            if before or after:
                self.fault(
                    f"emulated GPU: out-of-bounds write around the {size}-byte allocation at {address:#x}: "
                    f"{before} guard bytes before it and {after} after it overwritten"
                )

    def span(self, address: int, nbytes: int, what: str) -> None:
        """Refuse an access of ``nbytes`` at ``address`` that is not inside one live allocation."""
        if nbytes <= 0:
            return
        entries = self._entries()
        for start, _, _, size in entries:
            if start <= address and address + nbytes <= start + size:
                return
        near = [(abs(address - start), start, size) for start, _, _, size in entries]
        closest = min(near, default=None)
        where = "no allocation is live" if closest is None else (
            f"the nearest allocation is {closest[2]} bytes at {closest[1]:#x}")  # fmt: skip
        self.fault(f"emulated GPU: {what} reaches {nbytes} bytes at {address:#x}, outside every allocation ({where})")

    def take_faults(self) -> list[str]:
        """The faults found so far (guards checked once more first), forgotten."""
        try:
            self.check()
        except AssertionError:
            pass
        found, self.faults = self.faults, []
        return found


MEMORY = DeviceMemory()


def raw(address: int, dtype: Any, count: int) -> np.ndarray:
    """``count`` elements of ``dtype`` at host ``address``, writable, no copy."""
    dtype = np.dtype(dtype)
    return np.frombuffer((ctypes.c_char * max(count * dtype.itemsize, 1)).from_address(address), dtype)[:count]


def device(address: int, dtype: Any, count: int, what: str) -> np.ndarray:
    """``count`` elements of ``dtype`` at device ``address``, writable, no copy; refused outside an allocation."""
    MEMORY.span(address, count * np.dtype(dtype).itemsize, what)
    return raw(address, dtype, count)
