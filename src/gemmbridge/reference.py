"""The GEMM contract in float64 NumPy: what every backend's result is checked against."""

from __future__ import annotations

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


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

    GELU is the tanh approximation, ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``.
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
        r = 0.5 * r * (1.0 + np.tanh(_SQRT_2_OVER_PI * (r + 0.044715 * r**3)))
    return r
