"""CPU backend: the BLAS that NumPy ships.

``np.matmul`` hands row- and column-major (transposed) matrices to the BLAS
without copying; alpha, beta·c, bias and the epilogue are applied in place on
the output. Half types (float16, bfloat16) are converted to float32 copies,
accumulated in float32 and rounded once into the output, like cuBLASLt.
"""

from __future__ import annotations

import numpy as np

from ..problem import Problem
from ..reference import SQRT_2_OVER_PI


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (the form cuBLASLt's GELU epilogue computes), in place."""
    inner = np.multiply(x, x, out=np.empty_like(x))
    inner *= 0.044715
    inner += 1.0
    inner *= x
    inner *= SQRT_2_OVER_PI
    np.tanh(inner, out=inner)
    inner += 1.0
    inner *= 0.5
    x *= inner
    return x


def _as_matrices(x: np.ndarray, transpose: bool, vector_axis: int) -> np.ndarray:
    if x.ndim == 1:
        return np.expand_dims(x, vector_axis)
    return np.swapaxes(x, -1, -2) if transpose else x


def _promoted(x: np.ndarray, a_vec: bool, b_vec: bool) -> np.ndarray:
    """View of a result-shaped array with the squeezed 1-D dims put back."""
    if b_vec:
        x = np.expand_dims(x, -1)
    if a_vec:
        x = np.expand_dims(x, -2)
    return x


def run(
    problem: Problem,
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray | None,
    bias: np.ndarray | None,
    out: np.ndarray,
    alpha: float,
    beta: float,
) -> None:
    """Write ``epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` into ``out``."""
    a_vec, b_vec = a.ndim == 1, b.ndim == 1
    lhs = _as_matrices(a, problem.transpose_a, 0)
    rhs = _as_matrices(b, problem.transpose_b, -1)
    half = problem.dtype in ("float16", "bfloat16")
    if half:
        lhs, rhs = lhs.astype(np.float32), rhs.astype(np.float32)
    target = _promoted(out, a_vec, b_vec)
    in_place_c = c is not None and np.shares_memory(c, out)
    acc = np.matmul(lhs, rhs, out=None if half or in_place_c else target)
    if alpha != 1.0:
        acc *= alpha
    if c is not None and beta != 0.0:
        acc += beta * _promoted(c, a_vec, b_vec).astype(acc.dtype, copy=False)
    if bias is not None:
        acc += bias.astype(acc.dtype, copy=False)
    if problem.epilogue == "relu":
        np.maximum(acc, 0, out=acc)
    elif problem.epilogue == "gelu":
        gelu_tanh(acc)
    if acc is not target:
        target[...] = acc
