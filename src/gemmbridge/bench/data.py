"""Benchmark data: dtypes and their tolerances, fresh random inputs, the float64 reference, relative error.

On the CPU inputs are numpy arrays (bfloat16 through ml_dtypes) and the reference is numpy float64; on
CUDA inputs are torch CUDA tensors and the reference is torch float64 on the same device. Inputs are
standard normal (never zeros), drawn afresh for every shape; errors are ‖x − ref‖_F / ‖ref‖_F.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError
from ..problem import ITEMSIZE
from ..reference import TOLERANCE
from ..reference import reference as reference64
from ..reference import rel_err as rel_err64
from .presets import Shape


@dataclass(frozen=True)
class DType:
    label: str  # what the user types: bf16, fp16, tf32, fp32, fp64
    name: str  # the storage dtype: bfloat16, float16, float32, float64

    @property
    def tf32(self) -> bool:
        """float32 inputs, TF32 tensor cores allowed."""
        return self.label == "tf32"

    @property
    def tolerance(self) -> float:
        """Relative Frobenius error a correct candidate stays under."""
        return TOLERANCE["tf32" if self.tf32 else self.name]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.name]


DTYPES = {
    "bf16": DType("bf16", "bfloat16"),
    "fp16": DType("fp16", "float16"),
    "tf32": DType("tf32", "float32"),
    "fp32": DType("fp32", "float32"),
    "fp64": DType("fp64", "float64"),
}


def parse_dtypes(text: str) -> list[DType]:
    """``bf16,fp32`` → DTypes, in the order given."""
    labels = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in labels if t not in DTYPES]
    if unknown or not labels:
        raise OptionError(f"--dtype {text!r}: choose from {', '.join(DTYPES)} (comma list ok)")
    return [DTYPES[t] for t in dict.fromkeys(labels)]


def numpy_dtype(dtype: DType) -> Any:
    if dtype.name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype.name)


def torch_dtype(dtype: DType) -> Any:
    import torch

    return getattr(torch, dtype.name)


def _stored(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    """The row-major array an operand of ``shape`` is a transposed view of (its last two dims swapped)."""
    return (*shape[:-2], shape[-1], shape[-2]) if transposed else shape


def make_inputs(device: str, shape: Shape, dtype: DType, rng: np.random.Generator) -> tuple[Any, Any]:
    """Fresh standard-normal ``op(a)`` (batch, M, K) and ``op(b)`` (batch, K, N) on ``device``: row-major, or
    transposed views of row-major arrays where ``shape`` says so."""
    stored = _stored(shape.a_shape, shape.transpose_a), _stored(shape.b_shape, shape.transpose_b)
    a: Any
    b: Any
    if device == "cpu":
        a, b = (rng.standard_normal(s, dtype=np.float32).astype(numpy_dtype(dtype)) for s in stored)
    else:
        import torch

        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        a, b = (torch.randn(s, generator=gen, device=device, dtype=torch_dtype(dtype)) for s in stored)
    a = a.swapaxes(-1, -2) if shape.transpose_a else a
    b = b.swapaxes(-1, -2) if shape.transpose_b else b
    return a, b


def to_float64(x: Any, device: str) -> Any:
    """``x`` (numpy, torch, cupy...) as float64 where the reference lives: numpy on CPU, torch on CUDA."""
    if device == "cpu":
        if type(x).__module__.startswith("torch"):
            return x.detach().to("cpu").double().numpy()
        return np.asarray(x).astype(np.float64)
    import torch

    if not isinstance(x, torch.Tensor):
        x = torch.from_dlpack(x)  # cupy and others: zero-copy
    return x.detach().double()


def reference(a: Any, b: Any, device: str) -> Any:
    """``a @ b`` in float64, from the (rounded) inputs."""
    if device == "cpu":
        return reference64(a, b)
    return a.double() @ b.double()


def rel_err(x: Any, ref: Any, device: str) -> float:
    """‖x − ref‖_F / ‖ref‖_F; inf for a wrong shape, NaN results give NaN."""
    got = to_float64(x, device)
    if tuple(got.shape) != tuple(ref.shape):
        return float("inf")
    if device == "cpu":
        return rel_err64(got, ref)
    return float((got - ref).norm() / ref.norm())


def poison(device: str, shape: Shape, dtype: DType) -> None:
    """Fill and free a NaN buffer of the result's size, so that a candidate that leaves memory unwritten
    (the allocator hands the freed block back) reads as wrong rather than as a stale right answer."""
    if device == "cpu":
        np.full(shape.out_shape, np.nan, dtype=numpy_dtype(dtype))
    else:
        import torch

        torch.full(shape.out_shape, float("nan"), device=device, dtype=torch_dtype(dtype))
