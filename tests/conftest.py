"""Framework fixtures: one object per (framework, device) that makes, views and reads back arrays.

Tests build every operand from float64 numpy data through a ``Framework`` and
read results back with ``to_numpy64``, so one suite runs unchanged on numpy,
torch, JAX and CuPy, on the CPU and (marked ``gpu``) on CUDA.
"""

from __future__ import annotations

import importlib
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest

DTYPES = ("float64", "float32", "float16", "bfloat16")
NP_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

# Layouts a test can ask ``Framework.view`` for; each gives a view whose values are the given data.
LAYOUTS = ("contiguous", "transposed", "row_strided", "col_strided", "offset", "negative")


def _has_jax_gpu(jax: Any) -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


class Framework:
    """Arrays of one framework on one device, as the tests need them."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device = name, device
        self.mutable = name != "jax"  # JAX arrays are immutable: out= is refused
        self.negative_strides = name in ("numpy", "cupy")
        if name == "numpy":
            self.xp = np
        elif name == "torch":
            self.xp = pytest.importorskip("torch")
            if device == "cuda" and not self.xp.cuda.is_available():
                pytest.skip("torch sees no CUDA device")
        elif name == "cupy":
            self.xp = pytest.importorskip("cupy")
            try:
                count = self.xp.cuda.runtime.getDeviceCount()
            except Exception:  # no driver
                count = 0
            if count == 0:
                pytest.skip("cupy sees no CUDA device")
        elif name == "jax":
            jax = pytest.importorskip("jax")
            jax.config.update("jax_enable_x64", True)
            if device == "cuda" and not _has_jax_gpu(jax):
                pytest.skip("jax has no gpu backend")
            self.jax = jax
            self.xp = importlib.import_module("jax.numpy")
            self.jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]

    def __repr__(self) -> str:
        return f"{self.name}-{self.device}"

    # -- making and reading arrays -----------------------------------------------------------------

    def native_dtype(self, dtype: str) -> Any:
        if self.name == "torch":
            return getattr(self.xp, dtype)
        if self.name == "cupy" and dtype == "bfloat16":
            try:
                self.xp.asarray(np.ones(1, ml_dtypes.bfloat16))
            except Exception:
                pytest.skip("this cupy has no bfloat16")
        return NP_DTYPES[dtype]

    def from_numpy(self, arr: np.ndarray, dtype: str) -> Any:
        """A contiguous array of ``dtype`` on the device holding ``arr`` (rounded)."""
        arr = np.asarray(arr)
        if self.name == "numpy":
            return np.array(arr, dtype=NP_DTYPES[dtype], order="C")
        if self.name == "torch":
            x = self.xp.empty(arr.shape, dtype=self.native_dtype(dtype), device=self.device)
            return x.copy_(self.xp.from_numpy(np.array(arr, order="C")))
        if self.name == "cupy":
            return self.xp.asarray(arr.astype(self.native_dtype(dtype)))
        return self.xp.asarray(arr.astype(NP_DTYPES[dtype]), device=self.jax_device)

    def to_numpy64(self, x: Any) -> np.ndarray:
        """A float64 numpy copy of ``x``."""
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

    def type_check(self, x: Any) -> None:
        """``x`` is this framework's own array type, on this device."""
        if self.name == "numpy":
            assert type(x) is np.ndarray
        elif self.name == "torch":
            assert isinstance(x, self.xp.Tensor)
            assert x.device.type == self.device
        elif self.name == "cupy":
            assert isinstance(x, self.xp.ndarray)
        else:
            assert isinstance(x, self.jax.Array)
            assert x.devices() == {self.jax_device}

    # -- views ---------------------------------------------------------------------------------------

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
            pytest.skip(f"{self.name} has no negative strides")
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


FRAMEWORKS = [
    pytest.param(("numpy", "cpu"), id="numpy-cpu"),
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("jax", "cpu"), id="jax-cpu"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("cupy", "cuda"), id="cupy-cuda", marks=pytest.mark.gpu),
    pytest.param(("jax", "cuda"), id="jax-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=FRAMEWORKS)
def fw(request: pytest.FixtureRequest) -> Framework:
    """Every (framework, device) pair; unavailable ones are skipped."""
    return Framework(*request.param)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random data for each test, reproducible from the test's id."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Each test starts with an empty problem cache."""
    import gemmbridge

    gemmbridge.clear_cache()
