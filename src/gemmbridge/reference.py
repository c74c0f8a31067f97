"""The GEMM contract in float64 NumPy: what every backend's result is checked against."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Relative Frobenius error a correct result stays under, by dtype ("tf32": float32 on TF32 tensor cores)
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "tf32": 3e-3, "float16": 1e-2, "bfloat16": 1e-2}
# cuBLASLt evaluates the GELU epilogue with less than full precision: measured up to 1.3e-9 in float64
# (tests/test_contract.py) and 1.06e-5 in float32 (a soak on an H100, 2026-11-25)
GELU_TOLERANCE = {"float64": 1e-8, "float32": 5e-5}


def gelu(x: Any, xp: Any = np) -> Any:
    """GELU, tanh approximation: ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``, with array module ``xp``."""
    return 0.5 * x * (1.0 + xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def rel_err(x: Any, ref: np.ndarray) -> float:
    """‖x − ref‖_F / ‖ref‖_F in float64 (``x`` any NumPy-convertible array); NaN results give NaN."""
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def reference(
    a: np.ndarray,
    b: np.ndarray,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    c: np.ndarray | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: np.ndarray | None = None,
    epilogue: str = "none",
) -> np.ndarray:
    """``epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` in float64, numpy ``matmul`` semantics.

    GELU is the tanh approximation (``gelu``).
    """
    a = np.swapaxes(a, -1, -2) if transpose_a else a
    b = np.swapaxes(b, -1, -2) if transpose_b else b
    r = alpha * np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))
    if c is not None:
        r = r + beta * np.asarray(c, np.float64)
    if bias is not None:
        r = r + np.asarray(bias, np.float64)
    if epilogue == "relu":
        r = np.maximum(r, 0.0)
    elif epilogue == "gelu":
        r = gelu(r)
    return r
