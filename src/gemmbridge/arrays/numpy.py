"""NumPy arrays (CPU only; bfloat16 through ml_dtypes)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, OperandTypeError
from ..problem import TensorMeta


def _element_strides(x: np.ndarray) -> tuple[int, ...]:
    size = x.itemsize
    if any(s % size for s in x.strides):
        raise OperandTypeError(
            f"matmul: an operand of shape {x.shape} has byte strides {x.strides} "
            f"that are not multiples of its itemsize {size}"
        )
    return tuple(s // size for s in x.strides)


class NumpyArrays:
    name = "numpy"
    mutable = True

    def accepts(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def key(self, x: np.ndarray) -> tuple:
        return x.shape, x.strides, x.dtype

    def meta(self, x: np.ndarray) -> TensorMeta:
        return TensorMeta(x.shape, _element_strides(x), x.dtype.name, "cpu")

    def pointer(self, x: np.ndarray) -> int:
        return int(x.__array_interface__["data"][0])

    def writable(self, x: Any) -> bool:
        return bool(x.flags.writeable)

    def empty(self, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        return np.empty(shape, dtype=like.dtype)

    def zeros(self, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        return np.zeros(shape, dtype=like.dtype)

    def contiguous(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    def copy_into(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_numpy(self, x: np.ndarray, like: np.ndarray) -> np.ndarray:
        return x

    def _no_gpu(self, *_: Any) -> Any:
        raise BackendUnavailableError("numpy arrays live on the CPU; there is no CUDA stream for them")

    current_device = _no_gpu
    finish = None
    stream = _no_gpu
    capturing = _no_gpu
    workspace = _no_gpu

    def device_guard(self, index: int) -> AbstractContextManager:
        return self._no_gpu()

    def default_allow_tf32(self) -> bool:
        return False
