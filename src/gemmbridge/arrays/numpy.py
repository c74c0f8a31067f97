"""NumPy arrays (CPU only; bfloat16 through ml_dtypes)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import BackendUnavailableError, OperandTypeError
from ..problem import TensorMeta

DTYPES = {"bfloat16": ml_dtypes.bfloat16}


def element_strides(x: Any) -> tuple[int, ...]:
    """Byte strides of an array with ``shape``, ``strides`` and ``itemsize`` as strides in elements."""
    size = x.itemsize
    if any(s % size for s in x.strides):
        raise OperandTypeError(
            f"matmul: an operand of shape {x.shape} has byte strides {x.strides} "
            f"that are not multiples of its itemsize {size}"
        )
    return tuple(s // size for s in x.strides)


def numpy_dtype(name: str) -> Any:
    return DTYPES.get(name, name)


class NumpyCall:
    """A CPU call on NumPy arrays: the arrays are their own host views."""

    __slots__ = ()
    device = -1
    stream = 0
    capturing = False
    graph_owns_memory = False
    finish = None

    def tf32(self) -> bool:
        return False

    def empty(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.empty(shape, dtype=numpy_dtype(dtype))

    def zeros(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.zeros(shape, dtype=numpy_dtype(dtype))

    def contiguous(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    def transposed(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(x, -1, -2))

    def copy_into(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def host(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_host(self, x: np.ndarray) -> np.ndarray:
        return x

    blas = staticmethod(np.matmul)


_CALL = NumpyCall()


class NumpyArrays:
    name = "numpy"
    mutable = True
    autograd = None
    layer = None
    written = None

    def accepts(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def key(self, x: np.ndarray) -> tuple:
        return x.shape, x.strides, x.dtype

    def meta(self, x: np.ndarray) -> TensorMeta:
        return TensorMeta(x.shape, element_strides(x), x.dtype.name, "cpu")

    def pointer(self, x: np.ndarray) -> int:
        return int(x.__array_interface__["data"][0])

    def writable(self, x: np.ndarray) -> str | None:
        return None if x.flags.writeable else "it is read-only"

    def context(self, device: int, like: np.ndarray) -> NumpyCall:
        return _CALL

    def current_device(self) -> int:
        raise BackendUnavailableError("numpy arrays live on the CPU; there is no CUDA device for them")

    def device_guard(self, index: int) -> AbstractContextManager:
        raise BackendUnavailableError("numpy arrays live on the CPU; there is no CUDA device for them")
