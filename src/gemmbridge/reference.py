"""The GEMM contract in float64 NumPy: what every backend's result is checked against."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import epilogues

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Relative Frobenius error a correct result stays under, by dtype ("tf32": float32 on TF32 tensor cores)
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "tf32": 3e-3, "float16": 1e-2, "bfloat16": 1e-2}
# cuBLASLt evaluates the GELU epilogue with less than full precision: measured up to 1.3e-9 in float64
# (tests/test_contract.py) and 1.06e-5 in float32 (a soak on an H100, 2026-11-25)
GELU_TOLERANCE = {"float64": 1e-8, "float32": 5e-5}


def gelu(x: Any, xp: Any = np) -> Any:
    """GELU, tanh approximation: ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``, with array module ``xp``."""
    return 0.5 * x * (1.0 + xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def gelu_grad(x: Any, xp: Any = np) -> Any:
    """d gelu / dx of the tanh form: ``0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)``, ``t = tanh(u)``."""
    t = xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def rel_err(x: Any, ref: np.ndarray) -> float:
    """‖x − ref‖_F / ‖ref‖_F in float64 (``x`` any NumPy-convertible array); NaN results give NaN."""
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def expected(
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
    aux: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every output of a call in float64, numpy ``matmul`` semantics (``epilogues.py`` has the formulas).

    ``d``: the result; ``pre``: ``P + bias``, what a ``*_aux`` epilogue saves (a relu aux holds
    ``pre > 0``); ``bias_grad`` where the epilogue makes one. ``aux`` (``d*`` epilogues): the saved
    pre-activation (float, gelu) or mask (bool, relu), ``M × N`` without padding.
    """
    kind = epilogues.TABLE[epilogue]
    a = np.swapaxes(a, -1, -2) if transpose_a else a
    b = np.swapaxes(b, -1, -2) if transpose_b else b
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = alpha * np.matmul(a64, b64)
    if c is not None:
        r = r + beta * np.asarray(c, np.float64)
    if bias is not None:
        r = r + np.asarray(bias, np.float64)
    found = {"pre": r}
    if kind.activation == "relu":
        r = np.maximum(r, 0.0)
    elif kind.activation == "gelu":
        r = gelu(r)
    if kind.aux_in == "relu":
        assert aux is not None
        r = r * np.asarray(aux, bool)
    elif kind.aux_in == "gelu":
        assert aux is not None
        r = r * gelu_grad(np.asarray(aux, np.float64))
    found["d"] = r
    if kind.bias_grad == "d":
        found["bias_grad"] = r.sum(axis=-2)
    elif kind.bias_grad == "a":
        found["bias_grad"] = a64.sum(axis=-1)
    elif kind.bias_grad == "b":
        found["bias_grad"] = b64.sum(axis=-2)
    return found


def reference(a: np.ndarray, b: np.ndarray, **options: Any) -> np.ndarray:
    """``epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` in float64 (``expected``'s ``d``)."""
    return expected(a, b, **options)["d"]
