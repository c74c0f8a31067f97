"""Arrays of any framework from NumPy data, for the test suite and the tools (``gemmbridge stress``).

One ``Framework(name, device)`` per (framework, device) makes arrays from float64 NumPy data, cuts the
views a test asks for (``LAYOUTS``), and reads results back as float64 NumPy copies, so that one test or
one stress mix runs unchanged on numpy, torch, JAX and CuPy, on the CPU and on CUDA. Importing this module
needs only NumPy and ml_dtypes; a framework is imported when a ``Framework`` of it is made.

What this machine lacks (the framework, the device, bfloat16 in CuPy, negative strides in torch and JAX)
raises ``Unavailable``; ``tests/conftest.py`` turns it into a skip.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = ("float64", "float32", "float16", "bfloat16")
NP_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
FRAMEWORKS = ("numpy", "torch", "cupy", "jax")

# Layouts ``Framework.view`` makes; each gives a view whose values are the given data.
LAYOUTS = ("contiguous", "transposed", "row_strided", "col_strided", "offset", "negative")


class Unavailable(Exception):
    """The framework, its device or a feature asked for is not available on this machine."""


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise Unavailable(f"{name} is not installed ({error})") from None


def _cupy_devices(cupy: Any) -> int:
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver
        return 0


def _cupy_has_bfloat16(cupy: Any) -> bool:
    try:
        cupy.asarray(np.ones(1, ml_dtypes.bfloat16))
    except Exception:
        return False
    return True


def _jax_gpus(jax: Any) -> list[Any]:
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


class Framework:
    """Arrays of one framework on one device: made from NumPy data, viewed, read back."""

    def __init__(self, name: str, device: str) -> None:
        if name not in FRAMEWORKS or device not in ("cpu", "cuda"):
            raise ValueError(f"Framework({name!r}, {device!r}): choose from {FRAMEWORKS} on cpu or cuda")
        self.name, self.device = name, device
        self.mutable = name != "jax"  # JAX arrays are immutable: out= is refused
        self.negative_strides = name in ("numpy", "cupy")
        self.dtypes: tuple[str, ...] = DTYPES  # the floating types this framework has
        if name == "numpy":
            if device != "cpu":
                raise Unavailable("numpy arrays live on the CPU")
            self.xp: Any = np
        elif name == "torch":
            self.xp = _import("torch")
            if device == "cuda" and not self.xp.cuda.is_available():
                raise Unavailable("torch sees no CUDA device")
        elif name == "cupy":
            if device != "cuda":
                raise Unavailable("cupy arrays live on the GPU")
            self.xp = _import("cupy")
            if _cupy_devices(self.xp) == 0:
                raise Unavailable("cupy sees no CUDA device")
            if not _cupy_has_bfloat16(self.xp):
                self.dtypes = tuple(d for d in DTYPES if d != "bfloat16")
        else:
            self.jax = _import("jax")
            self.jax.config.update("jax_enable_x64", True)  # float64 stays float64
            if device == "cuda" and not _jax_gpus(self.jax):
                raise Unavailable("jax has no gpu backend")
            self.xp = importlib.import_module("jax.numpy")
            self.jax_device = self.jax.devices("gpu" if device == "cuda" else "cpu")[0]

    def __repr__(self) -> str:
        return f"{self.name}-{self.device}"

    # -- dtypes -------------------------------------------------------------------------------------

    def native_dtype(self, dtype: str) -> Any:
        """The framework's dtype object for the name ``dtype`` (``float32``, ``bfloat16``, ``int32``, ...)."""
        if dtype in DTYPES and dtype not in self.dtypes:
            raise Unavailable(f"this {self.name} has no {dtype}")
        if self.name == "torch":
            return getattr(self.xp, dtype)
        return NP_DTYPES.get(dtype) or np.dtype(dtype)

    def dtype_name(self, x: Any) -> str:
        """``x``'s dtype by name (``float32``, ``bfloat16``), whatever the framework."""
        return str(x.dtype).removeprefix("torch.")

    # -- making and reading arrays ------------------------------------------------------------------

    def from_numpy(self, arr: np.ndarray, dtype: str) -> Any:
        """A contiguous array of ``dtype`` on this device holding ``arr`` (rounded); 0-d stays 0-d."""
        arr = np.asarray(arr)
        if self.name == "numpy":
            return np.array(arr, dtype=self.native_dtype(dtype), order="C")
        if self.name == "torch":
            x = self.xp.empty(arr.shape, dtype=self.native_dtype(dtype), device=self.device)
            return x.copy_(self.xp.from_numpy(np.array(arr, order="C")))
        host = np.array(arr, dtype=self.native_dtype(dtype), order="C")
        if self.name == "cupy":
            return self.xp.asarray(host)
        return self.jax.device_put(host, self.jax_device)

    def to_numpy64(self, x: Any) -> np.ndarray:
        """A float64 NumPy copy of ``x`` (never a view: ``out=c`` overwrites ``c`` after its copy is taken)."""
        if self.name == "torch":
            return x.detach().cpu().to(self.xp.float64).numpy().copy()
        if self.name == "cupy":
            return self.xp.asnumpy(x).astype(np.float64)
        return np.array(x, dtype=np.float64)

    def poisoned(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An output buffer filled with NaN, so that any element left unwritten shows."""
        return self.from_numpy(np.full(shape, np.nan), dtype)

    empty = poisoned

    def snapshot(self, x: Any) -> bytes:
        """The raw bytes of ``x``'s elements (NaN payloads included), for byte-identity checks."""
        if self.name == "torch":
            flat = x.detach().cpu().clone().contiguous().reshape(-1)
            return flat.view(self.xp.uint8).numpy().tobytes()
        if self.name == "cupy":
            return self.xp.asnumpy(x).tobytes()
        return np.array(x).tobytes()

    def owns(self, x: Any) -> bool:
        """Whether ``x`` is this framework's own array type, on this device."""
        if self.name == "numpy":
            return type(x) is np.ndarray
        if self.name == "torch":
            return isinstance(x, self.xp.Tensor) and x.device.type == self.device
        if self.name == "cupy":
            return isinstance(x, self.xp.ndarray)
        return isinstance(x, self.jax.Array) and x.devices() == {self.jax_device}

    def type_check(self, x: Any) -> None:
        """Assert that ``x`` is this framework's own array type, on this device."""
        assert self.owns(x), f"{type(x).__module__}.{type(x).__name__} is not a {self} array"

    # -- views --------------------------------------------------------------------------------------

    def mT(self, x: Any) -> Any:
        """``x`` with its last two dims swapped (a view where the framework has views)."""
        if self.name == "torch":
            return x.transpose(-1, -2)
        return self.xp.swapaxes(x, -1, -2)

    def broadcast_to(self, x: Any, shape: tuple[int, ...]) -> Any:
        """A stride-0 (expanded) view of ``x``."""
        if self.name == "torch":
            return x.expand(shape)
        return self.xp.broadcast_to(x, shape)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        if self.name == "torch":
            return x.movedim(src, dst)
        return self.xp.moveaxis(x, src, dst)

    def view(self, arr: np.ndarray, dtype: str, layout: str, rng: np.random.Generator) -> Any:
        """A ``layout`` view (see LAYOUTS) whose values are ``arr``, cut from a larger random buffer."""
        if layout == "contiguous":
            return self.from_numpy(arr, dtype)
        if layout == "transposed":
            return self.mT(self.from_numpy(np.swapaxes(arr, -1, -2), dtype))
        if layout == "batch_permuted":  # batch stride smaller than the matrix's
            return self.moveaxis(self.from_numpy(np.moveaxis(arr, 0, -2), dtype), -2, 0)
        parent_shape, index = self._cut(arr.shape, layout)
        parent = rng.standard_normal(parent_shape)
        parent[index] = arr
        return self.from_numpy(parent, dtype)[index]

    def out_view(self, shape: tuple[int, ...], dtype: str, layout: str) -> tuple[Any, Any, np.ndarray]:
        """A NaN-poisoned ``layout`` view to pass as out=, its parent buffer, and the mask of the view in it."""
        if layout == "contiguous":
            out = self.poisoned(shape, dtype)
            return out, out, np.ones(shape, bool)
        if layout == "transposed":
            parent = self.poisoned(shape[:-2] + (shape[-1], shape[-2]), dtype)
            return parent, self.mT(parent), np.ones(shape[:-2] + (shape[-1], shape[-2]), bool)
        parent_shape, index = self._cut(shape, layout)
        parent = self.poisoned(parent_shape, dtype)
        mask = np.zeros(parent_shape, bool)
        mask[index] = True
        return parent, parent[index], mask

    def _cut(self, shape: tuple[int, ...], layout: str) -> tuple[tuple[int, ...], tuple[slice, ...]]:
        """Parent shape and index for ``layout``; the index applied to the parent gives ``shape``.

        row_strided: ``x[..., ::2, :]`` (leading dim twice the row length); col_strided: ``x[..., ::2]``
        (two non-unit strides for a matrix: needs a copy); offset: ``x[..., 1:, 1:]`` (odd element
        offset, odd leading dim); batch_strided: ``x[::2]``; negative: ``x[..., ::-1, :]`` (numpy and
        cupy only). For 1-D data, the strided layouts are ``x[::2]``, offset ``x[1:]``, negative ``x[::-1]``.
        """
        if layout == "negative" and not self.negative_strides:
            raise Unavailable(f"{self.name} has no negative strides")
        parent = list(shape)
        index = [slice(None)] * len(shape)
        row = -2 if len(shape) >= 2 else -1
        if layout in ("row_strided", "col_strided", "batch_strided"):
            axis = {"row_strided": row, "col_strided": -1, "batch_strided": 0}[layout]
            parent[axis] *= 2
            index[axis] = slice(None, None, 2)
        elif layout == "offset":
            for axis in range(-min(len(shape), 2), 0):
                parent[axis] += 1
                index[axis] = slice(1, None)
        elif layout == "negative":
            index[row] = slice(None, None, -1)
        elif layout != "contiguous":
            raise ValueError(layout)
        return tuple(parent), tuple(index)
