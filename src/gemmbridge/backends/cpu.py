"""CPU backend: a BLAS for the product, and NumPy versions of every epilogue.

The product is ``np.matmul`` (NumPy's BLAS), or the caller framework's own where its context gives
one: PyTorch's ``torch.matmul`` on the same memory, since two BLAS thread pools on the same cores,
NumPy's spinning while torch's runs, made a CPU training step of ``examples/train_transformer.py``
32× slower (2.5 s against 78 ms). Both hand row- and column-major (transposed) matrices to the BLAS
without copying; alpha, beta·c, bias and the epilogue (``epilogues.py``) are applied in place on the
result. Half types (float16, bfloat16) are converted to float32 copies, accumulated in float32 and
rounded once into the result, like cuBLASLt; a float32 result from half inputs is written unrounded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import epilogues
from ..problem import HALF, Operands, Problem
from ..reference import SQRT_2_OVER_PI, gelu_grad

Blas = Callable[..., np.ndarray]


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


def relu_mask(pre: np.ndarray, width: int) -> np.ndarray:
    """The relu aux of ``pre`` (M × N): bit ``n % 8`` of byte ``n // 8`` of row m set where pre > 0."""
    bits = np.zeros((pre.shape[0], width * 8), dtype=bool)
    bits[:, : pre.shape[1]] = pre > 0
    return np.packbits(bits, axis=1, bitorder="little")


def _mask_of(aux: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(aux, axis=1, bitorder="little")[:, :n].astype(bool)


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


def run(problem: Problem, ops: Operands, alpha: float, beta: float, blas: Blas = np.matmul) -> None:
    """Write ``D`` (into ``ops.d``) and the epilogue's outputs (``ops.aux``, ``ops.bias_grad``).

    ``ops`` holds NumPy arrays; ``c`` is None or the given c (``beta`` is then applied). ``blas(lhs,
    rhs, out=None)`` computes the (batched) product.
    """
    a, b, c, out = ops.a, ops.b, ops.c, ops.d
    kind = epilogues.TABLE[problem.epilogue]
    a_vec, b_vec = a.ndim == 1, b.ndim == 1
    lhs = _as_matrices(a, problem.transpose_a, 0)
    rhs = _as_matrices(b, problem.transpose_b, -1)
    if problem.dtype in HALF:
        lhs, rhs = lhs.astype(np.float32), rhs.astype(np.float32)
    target = _promoted(out, a_vec, b_vec)
    # a training epilogue works on rows (a batch of a folds into them): its accumulator must be contiguous
    direct = lhs.dtype == target.dtype and not kind.training and (c is None or not np.shares_memory(c, out))
    acc = blas(lhs, rhs, out=target if direct else None)
    if alpha != 1.0:
        acc *= alpha
    if c is not None and beta != 0.0:
        acc += beta * _promoted(c, a_vec, b_vec).astype(acc.dtype, copy=False)
    if ops.bias is not None:
        acc += ops.bias.astype(acc.dtype, copy=False)
    if kind.training:  # works on rows (a batch of a folds into them): the product may follow a's strides
        acc = np.ascontiguousarray(acc)
    rows = acc.reshape(-1, acc.shape[-1]) if kind.training else acc  # (B·M) × N: a view of the contiguous acc
    if kind.aux_out == "gelu":
        ops.aux[:, : problem.n] = rows
    elif kind.aux_out == "relu":
        ops.aux[...] = relu_mask(rows, ops.aux.shape[1])
    if kind.activation == "relu":
        np.maximum(acc, 0, out=acc)
    elif kind.activation == "gelu":
        gelu_tanh(acc)
    if kind.aux_in == "relu":
        rows *= _mask_of(ops.aux, problem.n)
    elif kind.aux_in == "gelu":
        rows *= gelu_grad(ops.aux[:, : problem.n].astype(acc.dtype))
    if kind.bias_grad == "d":
        ops.bias_grad[...] = rows.sum(axis=0)
    elif kind.bias_grad == "a":
        ops.bias_grad[...] = lhs.sum(axis=1, dtype=acc.dtype)
    elif kind.bias_grad == "b":
        ops.bias_grad[...] = rhs.sum(axis=0, dtype=acc.dtype)
    if acc is not target:
        target[...] = acc
