"""CuPy arrays (CUDA)."""

from __future__ import annotations

import os
from typing import Any

import cupy
import numpy as np

from ..errors import OperandTypeError
from ..problem import TensorMeta


class CupyArrays:
    name = "cupy"
    mutable = True
    finish = None  # work is ordered on the caller's stream: nothing to wait for

    def accepts(self, x: Any) -> bool:
        return isinstance(x, cupy.ndarray)

    def key(self, x: cupy.ndarray) -> tuple:
        return x.shape, x.strides, x.dtype, x.device.id

    def meta(self, x: cupy.ndarray) -> TensorMeta:
        size = x.itemsize
        if any(s % size for s in x.strides):
            raise OperandTypeError(
                f"matmul: a cupy operand of shape {x.shape} has byte strides {x.strides} "
                f"that are not multiples of its itemsize {size}"
            )
        strides = tuple(s // size for s in x.strides)
        return TensorMeta(x.shape, strides, x.dtype.name, f"cuda:{x.device.id}")

    def pointer(self, x: cupy.ndarray) -> int:
        return x.data.ptr

    def writable(self, x: Any) -> bool:
        return True

    def empty(self, shape: tuple[int, ...], like: cupy.ndarray) -> cupy.ndarray:
        with like.device:
            return cupy.empty(shape, dtype=like.dtype)

    def zeros(self, shape: tuple[int, ...], like: cupy.ndarray) -> cupy.ndarray:
        with like.device:
            return cupy.zeros(shape, dtype=like.dtype)

    def contiguous(self, x: cupy.ndarray) -> cupy.ndarray:
        with x.device:
            return cupy.ascontiguousarray(x)

    def copy_into(self, dst: cupy.ndarray, src: cupy.ndarray) -> None:
        with dst.device:
            dst[...] = src

    def to_numpy(self, x: cupy.ndarray) -> np.ndarray:
        raise OperandTypeError("matmul: cupy arrays live on the GPU")

    def from_numpy(self, x: np.ndarray, like: cupy.ndarray) -> cupy.ndarray:
        raise OperandTypeError("matmul: cupy arrays live on the GPU")

    def current_device(self) -> int:
        return cupy.cuda.runtime.getDevice()

    def device_guard(self, index: int) -> cupy.cuda.Device:
        return cupy.cuda.Device(index)

    def stream(self, index: int) -> int:
        return cupy.cuda.get_current_stream(index).ptr

    def capturing(self, index: int) -> bool:
        return cupy.cuda.get_current_stream(index).is_capturing()

    def workspace(self, nbytes: int, like: cupy.ndarray) -> tuple[cupy.ndarray, int]:
        with like.device:
            buf = cupy.empty((nbytes,), dtype=cupy.uint8)
        return buf, buf.data.ptr

    def default_allow_tf32(self) -> bool:
        return os.environ.get("CUPY_TF32", "0") == "1"
