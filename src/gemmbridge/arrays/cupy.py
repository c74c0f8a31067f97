"""CuPy arrays (CUDA)."""

from __future__ import annotations

import os
from typing import Any

import cupy
import numpy as np

from ..errors import OperandTypeError
from ..problem import TensorMeta
from .numpy import element_strides, numpy_dtype


class CupyCall:
    """One call's device, stream, capture state and allocator."""

    __slots__ = ("device", "stream", "capturing", "_device")
    finish = None  # work is ordered on the caller's stream: nothing to wait for
    graph_owns_memory = False

    def __init__(self, device: int) -> None:
        stream = cupy.cuda.get_current_stream(device)
        self.device, self.stream, self.capturing = device, stream.ptr, stream.is_capturing()
        self._device = cupy.cuda.Device(device)

    def tf32(self) -> bool:
        return os.environ.get("CUPY_TF32", "0") == "1"

    def empty(self, shape: tuple[int, ...], dtype: str) -> cupy.ndarray:
        with self._device:
            return cupy.empty(shape, dtype=numpy_dtype(dtype))

    def zeros(self, shape: tuple[int, ...], dtype: str) -> cupy.ndarray:
        with self._device:
            return cupy.zeros(shape, dtype=numpy_dtype(dtype))

    def contiguous(self, x: cupy.ndarray) -> cupy.ndarray:
        with self._device:
            return cupy.ascontiguousarray(x)

    def transposed(self, x: cupy.ndarray) -> cupy.ndarray:
        with self._device:
            return cupy.ascontiguousarray(cupy.swapaxes(x, -1, -2))

    def copy_into(self, dst: cupy.ndarray, src: cupy.ndarray) -> None:
        with self._device:
            dst[...] = src

    def host(self, x: cupy.ndarray) -> np.ndarray:
        raise OperandTypeError("matmul: cupy arrays live on the GPU")

    def from_host(self, x: np.ndarray) -> cupy.ndarray:
        raise OperandTypeError("matmul: cupy arrays live on the GPU")

    blas = staticmethod(np.matmul)


class CupyArrays:
    name = "cupy"
    mutable = True
    autograd = None
    layer = None
    written = None

    def accepts(self, x: Any) -> bool:
        return isinstance(x, cupy.ndarray)

    def key(self, x: cupy.ndarray) -> tuple:
        return x.shape, x.strides, x.dtype, x.device.id

    def meta(self, x: cupy.ndarray) -> TensorMeta:
        return TensorMeta(x.shape, element_strides(x), x.dtype.name, f"cuda:{x.device.id}")

    def pointer(self, x: cupy.ndarray) -> int:
        return x.data.ptr

    def writable(self, x: cupy.ndarray) -> str | None:
        return None

    def context(self, device: int, like: cupy.ndarray) -> CupyCall:
        return CupyCall(device)

    def current_device(self) -> int:
        return cupy.cuda.runtime.getDevice()

    def device_guard(self, index: int) -> cupy.cuda.Device:
        return cupy.cuda.Device(index)
