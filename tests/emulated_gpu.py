"""NumPy arrays posing as CUDA arrays, run through the CUDA backend with cuBLASLt emulated (``cublaslt_emulator``).

``install(monkeypatch)`` installs it for one test: ``GpuArray`` operands (a NumPy subclass whose
metadata says ``cuda:0``) go through gemmbridge's plan layer, the CUDA backend's hot path and its
cuBLASLt bindings; only the library calls are emulated, on host memory. Every array of the emulated
device (the test's operands, gemmbridge's allocations and workspaces) is an allocation of
``device_memory``: guarded, and checked after every emulated launch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
from conftest import Framework
from cublaslt_emulator import FakeLt
from device_memory import MEMORY
from kernel_emulator import FakeKernels

from gemmbridge.arrays import BY_TYPE
from gemmbridge.arrays.numpy import NumpyArrays, numpy_dtype
from gemmbridge.problem import TensorMeta

EMULATED_DEVICE = {"name": "Emulated GPU", "sms": 132, "capability": "9.0", "driver": "0.0", "cuda_driver": 13000,
                   "cublasLt": 130100}  # fmt: skip


class GpuArray(np.ndarray):
    """A host array that gemmbridge takes for one on cuda:0."""


def on_device(x: np.ndarray, dtype: Any = None) -> GpuArray:
    """A copy of ``x`` (as ``dtype``) in a fresh allocation of the emulated device, C-ordered."""
    found = MEMORY.array(np.shape(x), x.dtype if dtype is None else dtype)
    found[...] = x
    return found.view(GpuArray)


class EmulatedCall:
    """A CUDA call context whose allocator is the emulated device's (``device_memory``)."""

    device, stream, finish, graph_owns_memory = 0, 0, None, False
    capturing = False
    tf32_default = False

    def tf32(self) -> bool:
        return self.tf32_default

    def empty(self, shape: tuple[int, ...], dtype: str) -> GpuArray:
        found = MEMORY.array(shape, numpy_dtype(dtype)).view(GpuArray)
        found.fill(np.nan if dtype != "uint8" else 0xAB)  # poisoned: an element left unwritten shows
        return found

    def zeros(self, shape: tuple[int, ...], dtype: str) -> GpuArray:
        found = MEMORY.array(shape, numpy_dtype(dtype)).view(GpuArray)
        found.fill(0)
        return found

    def contiguous(self, x: np.ndarray) -> GpuArray:
        return on_device(x)

    def transposed(self, x: np.ndarray) -> GpuArray:
        return on_device(np.swapaxes(x, -1, -2))

    def copy_into(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def host(self, x: Any) -> np.ndarray:
        raise AssertionError("a GPU call read an operand on the host")

    from_host = host


class EmulatedView(NumpyArrays):
    name = "emulated-cuda"

    def __init__(self) -> None:
        self.call = EmulatedCall()

    def key(self, x: np.ndarray) -> tuple:
        return "gpu", x.shape, x.strides, x.dtype

    def meta(self, x: np.ndarray) -> TensorMeta:
        found = super().meta(x)
        return TensorMeta(found.shape, found.strides, found.dtype, "cuda:0")

    def context(self, device: int, like: Any) -> EmulatedCall:
        assert device == 0
        return self.call

    def current_device(self) -> int:
        return 0

    def device_guard(self, index: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class EmulatedFramework(Framework):
    """The tests' NumPy framework, making ``GpuArray``s."""

    def __init__(self) -> None:
        super().__init__("numpy", "cpu")

    def __repr__(self) -> str:
        return "emulated-cuda"

    def from_numpy(self, arr: np.ndarray, dtype: str) -> Any:
        return on_device(super().from_numpy(arr, dtype))

    def type_check(self, x: Any) -> None:
        assert type(x) is GpuArray


def install(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeLt, EmulatedView]:
    """Route GpuArray through the CUDA backend with the emulated library and skinny kernel (mode "on"), on an
    emulated device of compute capability 9.0 with 132 SMs; returns (library, view)."""
    pytest.importorskip("nvmath.bindings.cublasLt")
    import gemmbridge
    from gemmbridge.backends import cuda
    from gemmbridge.backends.cuda import bindings, kernels, timer, tuning_cache, workspace

    fake, view = FakeLt(), EmulatedView()
    monkeypatch.setattr(timer, "WARMUP_MS", 0.0)  # emulated clocks never change (a test modelling them sets its own)
    monkeypatch.setattr(timer, "WARMUP_CHUNK_MS", 2.0)
    fake.kernels = FakeKernels()
    monkeypatch.setattr(kernels, "mode", "on")  # every problem the kernel can serve: its host side checked widely
    monkeypatch.setattr(kernels, "_broken", set())
    monkeypatch.setattr(kernels.launch, "kernel", fake.kernels.kernel)
    monkeypatch.setattr(kernels.launch, "_launch_v2", fake.kernels.launch)
    if kernels.launch._v2 is not None:  # cuda-bindings with _v2: the kernels launch with PDL (capability 9.0)
        monkeypatch.setattr(kernels.launch, "_launch_ex", fake.kernels.launch_ex)
    monkeypatch.setattr(bindings, "lt", fake)
    monkeypatch.setattr(bindings, "_handles", {})
    monkeypatch.setattr(cuda, "MAX_FLOPS", -1)  # no graph replay: it needs the driver
    monkeypatch.setattr(cuda, "ensure_context", lambda device: None)  # no driver context to make current
    monkeypatch.setattr(workspace, "_buffers", {})
    monkeypatch.setattr(workspace, "_streams_kept", {})
    monkeypatch.setattr(workspace, "_own", lambda ctx: (lambda buf: (buf, buf.ctypes.data))(
        MEMORY.allocate(workspace.WORKSPACE_BYTES)))  # fmt: skip
    monkeypatch.setitem(BY_TYPE, GpuArray, view)
    monkeypatch.setattr(tuning_cache, "_devices", {0: dict(EMULATED_DEVICE)})
    gemmbridge.clear_cache()
    return fake, view


class Events:
    """cuda.bindings.driver's event calls: between two records, ``ms_of()`` (of whatever ran last) per launch
    (``count()`` counts launches). A wait for an event outside thread-local capture mode fails the test: during
    another thread's global-mode capture (torch's default) it would fail and invalidate that capture."""

    def __init__(self, ms_of, count) -> None:  # type: ignore[no-untyped-def]
        from cuda.bindings import driver

        self.ok, self.ms_of, self.count, self.timed, self.records, self.mark = (
            driver.CUresult.CUDA_SUCCESS, ms_of, count, 0, 0, 0)  # fmt: skip
        self.CUstreamCaptureMode = driver.CUstreamCaptureMode
        self.mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL  # the thread's, as CUDA starts
        self.destroyed: list = []

    def cuThreadExchangeStreamCaptureMode(self, mode):  # type: ignore[no-untyped-def]
        before, self.mode = self.mode, mode
        return self.ok, before

    def cuEventCreate(self, flags):  # type: ignore[no-untyped-def]
        return self.ok, object()

    def cuEventRecord(self, event, stream):  # type: ignore[no-untyped-def]
        if self.records % 2 == 0:  # a start
            self.mark = self.count()
        self.records += 1
        return (self.ok,)

    def cuEventSynchronize(self, event):  # type: ignore[no-untyped-def]
        assert self.mode == self.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, "a wait not isolated"
        return (self.ok,)

    cuEventDestroy = lambda self, event: (self.ok,)  # noqa: E731

    def cuGraphExecDestroy(self, graph):  # type: ignore[no-untyped-def]
        self.destroyed.append(graph)
        return (self.ok,)

    def cuEventElapsedTime(self, start, end):  # type: ignore[no-untyped-def]
        self.timed += 1
        return self.ok, self.ms_of() * (self.count() - self.mark)
