"""The candidates ``gemmbridge bench`` times, one small class each.

A candidate says whether it can run at all (``available(device)`` → a reason it cannot, or None), whether
it takes one shape and dtype (``unsupported``), and turns the run's inputs into a no-argument callable
(``prepare``): everything that can be done once (views, plans) is done there, outside the timed region.
A callable with a ``close()`` method is closed when the shape is done. ``graph`` names the framework whose
CUDA graph captures the callable for GPU µs per op (``timing.gpu_us_per_op``), None when it is not captured
(``uncaptured`` says why).

Inputs are numpy arrays on the CPU and torch CUDA tensors on CUDA. The torch CPU candidate sees the numpy
arrays through ``torch.from_numpy``; CuPy sees the torch tensors through DLPack (zero-copy); nvmath-python
takes torch tensors directly and is planned once per shape (its stateful ``Matmul``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .data import DType
from .presets import Shape

CPU_ONLY = "runs on the CPU only; this run is on CUDA"
CUDA_ONLY = "runs on CUDA only; this run is on the CPU"


class Candidate:
    name = ""
    description = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    graph: str | None = "torch"
    uncaptured = ""  # why, when ``graph`` is None

    def available(self, device: str) -> str | None:
        """None when this candidate can run on ``device``, else why not."""
        if device not in self.devices:
            return CUDA_ONLY if device == "cpu" else CPU_ONLY
        return self._available(device)

    def _available(self, device: str) -> str | None:
        return None

    def unsupported(self, shape: Shape, dtype: DType) -> str | None:
        """None when this candidate takes ``shape`` in ``dtype``, else why not."""
        return None

    def prepare(self, a: Any, b: Any, dtype: DType) -> Callable[[], Any]:
        raise NotImplementedError


class Gemmbridge(Candidate):
    name = "gemmbridge"
    description = "gemmbridge.matmul (cuBLASLt on CUDA, NumPy's BLAS on the CPU)"

    def _available(self, device: str) -> str | None:
        if device == "cuda":
            try:
                from ..backends import cuda  # noqa: F401
            except ImportError as error:
                return f"the CUDA backend cannot load: {error} (pip install 'gemmbridge[cuda]')"
        return None

    def prepare(self, a: Any, b: Any, dtype: DType) -> Callable[[], Any]:
        from .. import matmul

        tf32 = dtype.tf32
        return lambda: matmul(a, b, allow_tf32=tf32)


class Torch(Candidate):
    name = "torch"
    description = "torch.matmul (cuBLAS on CUDA, its CPU BLAS on the CPU); TF32 through torch's own flag"

    def _available(self, device: str) -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed (pip install torch)"
        if device == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    def prepare(self, a: Any, b: Any, dtype: DType) -> Callable[[], Any]:
        import torch

        from ..arrays.torch import tensor_from_numpy

        if isinstance(a, np.ndarray):  # the CPU run's numpy inputs, seen in place
            a, b = tensor_from_numpy(a), tensor_from_numpy(b)
        return lambda: torch.matmul(a, b)


class Numpy(Candidate):
    name = "numpy"
    description = "numpy.matmul (its BLAS)"
    devices = ("cpu",)

    def unsupported(self, shape: Shape, dtype: DType) -> str | None:
        if dtype.itemsize == 2:
            return f"numpy multiplies {dtype.name} in a plain loop, not its BLAS"
        return None

    def prepare(self, a: Any, b: Any, dtype: DType) -> Callable[[], Any]:
        return lambda: np.matmul(a, b)


class Triton(Candidate):
    name = "triton"
    description = "the project's own autotuned Triton GEMM (bench/triton_gemm.py), the write-our-own-kernel option"
    devices = ("cuda",)

    def _available(self, device: str) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        try:
            from . import triton_gemm  # noqa: F401
        except Exception as error:
            return f"the Triton kernel cannot load: {type(error).__name__}: {error}"
        return None

    def unsupported(self, shape: Shape, dtype: DType) -> str | None:
        if dtype.name == "float64":
            return "the Triton kernel covers bf16, fp16, tf32 and fp32"
        if max(shape.m * shape.k, shape.k * shape.n, shape.m * shape.n) >= 2**31:
            return "the Triton kernel indexes one matrix with 32-bit offsets"
        return None

    def prepare(self, a: Any, b: Any, dtype: DType) -> Callable[[], Any]:
        from .triton_gemm import matmul

        tf32 = dtype.tf32
        return lambda: matmul(a, b, allow_tf32=tf32)


class Cupy(Candidate):
    name = "cupy"
    description = "cupy.matmul on zero-copy DLPack views of the torch tensors"
    devices = ("cuda",)
    graph = "cupy"

    def _available(self, device: str) -> str | None:
        try:
            import cupy
        except ImportError:
            return "cupy is not installed (pip install cupy-cuda13x)"
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                return "cupy sees no CUDA device"
        except Exception as error:
            return f"cupy cannot reach the CUDA runtime: {error}"
        return None

    def unsupported(self, shape: Shape, dtype: DType) -> str | None:
        tf32_env = os.environ.get("CUPY_TF32", "0") == "1"
        if dtype.name == "bfloat16":
            return "cupy has no bfloat16"
        if dtype.tf32 and not tf32_env:
            return "cupy uses TF32 only when CUPY_TF32=1 is set before it is imported"
        if dtype.label == "fp32" and tf32_env:
            return "CUPY_TF32=1 is set: cupy's float32 matmul runs on TF32"
        return None

    def prepare(self, a: Any, b: Any, dtype: DType) -> Callable[[], Any]:
        import cupy

        ca, cb = cupy.from_dlpack(a), cupy.from_dlpack(b)
        return lambda: cupy.matmul(ca, cb)


class _Planned:
    """nvmath-python's stateful Matmul: planned once, ``execute()`` per call, freed by ``close()``."""

    def __init__(self, mm: Any) -> None:
        self.mm = mm
        self.execute = mm.execute

    def __call__(self) -> Any:
        return self.execute()

    def close(self) -> None:
        self.mm.free()


class Nvmath(Candidate):
    name = "nvmath"
    description = "nvmath-python's stateful nvmath.linalg.advanced.Matmul (cuBLASLt), planned once per shape"
    devices = ("cuda",)
    graph = None
    # seen on an H200, nvmath-python 1.0.0, 2026-11-27: after a torch graph captured its execute, Matmul.free()
    # failed with CUDA_ERROR_INVALID_VALUE and left resources behind
    uncaptured = "nvmath-python's Matmul cannot be freed after a capture (CUDA_ERROR_INVALID_VALUE)"

    def _available(self, device: str) -> str | None:
        try:
            import nvmath.linalg.advanced  # noqa: F401
        except Exception as error:
            return f"nvmath-python is not usable: {error} (pip install nvmath-python)"
        return None

    def prepare(self, a: Any, b: Any, dtype: DType) -> Callable[[], Any]:
        from nvmath.linalg.advanced import Matmul, MatmulComputeType

        options = None
        if dtype.name == "float32":
            compute = MatmulComputeType.COMPUTE_32F_FAST_TF32 if dtype.tf32 else MatmulComputeType.COMPUTE_32F
            options = {"compute_type": compute}
        mm = Matmul(a, b, options=options)
        try:
            mm.plan()
        except BaseException:
            mm.free()
            raise
        return _Planned(mm)


ALL: tuple[type[Candidate], ...] = (Gemmbridge, Torch, Numpy, Triton, Cupy, Nvmath)
BASELINES = {"cpu": ("numpy", "torch"), "cuda": ("torch",)}  # the framework's own matmul, first timed wins


def candidates() -> list[Candidate]:
    return [kind() for kind in ALL]
