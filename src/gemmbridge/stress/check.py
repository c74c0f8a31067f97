"""One stress call made and judged: a valid call's result against float64, a failing call's error and ``out``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import errors
from ..ops import matmul
from ..reference import GELU_TOLERANCE, TOLERANCE, reference
from .draw import Call

ACCUMULATION_EPS = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "tf32": 2.0**-11,
    "float16": 2.0**-24,
    "bfloat16": 2.0**-24,
}


def check_result(call: Call, result: Any) -> str | None:
    """None when ``result`` is right, else what is wrong.

    Right: the caller's type and dtype, the reference's shape, ``out`` itself when given, no NaN (the
    poison), and within tolerance: ‖err‖/‖ref‖ ≤ tol, or — where the reference cancels to near zero —
    every element within tol·|ref| + (K + 4)·4ε·(|α|·|a|@|b| + |β|·|c| + |bias|), ε the accumulation's.
    """
    fw, kwargs = call.fw, call.kwargs
    if not fw.owns(result):
        return f"returned a {type(result).__module__}.{type(result).__name__}, not the caller's type"
    if "out" in kwargs and result is not kwargs["out"]:
        return "returned something else than out"
    name = "float32" if call.dtype == "tf32" else call.dtype
    if fw.dtype_name(result) != name:
        return f"returned dtype {fw.dtype_name(result)}, not {name}"
    if not call.inputs64:
        return None
    inp = call.inputs64
    options = {key: kwargs[key] for key in ("transpose_a", "transpose_b", "alpha", "beta", "epilogue") if key in kwargs}
    ref = reference(inp["a"], inp["b"], c=inp.get("c"), bias=inp.get("bias"), **options)
    got = fw.to_numpy64(result)
    if got.shape != ref.shape:
        return f"shape {got.shape}, reference {ref.shape}"
    if not np.isfinite(got).all():
        return "NaN or inf in the result (out not fully written?)"
    diff = np.abs(got - ref)
    scale = float(np.linalg.norm(ref))
    tol = TOLERANCE[call.dtype]
    if options.get("epilogue") == "gelu":
        tol = GELU_TOLERANCE.get(call.dtype, tol)
    err = float(np.linalg.norm(diff)) / scale if scale else float(np.abs(got).max(initial=0.0))
    if err <= tol:
        return None
    bound = reference(np.abs(inp["a"]), np.abs(inp["b"]), c=None if "c" not in inp else np.abs(inp["c"]),
                      bias=None if "bias" not in inp else np.abs(inp["bias"]),
                      transpose_a=options.get("transpose_a", False), transpose_b=options.get("transpose_b", False),
                      alpha=abs(options.get("alpha", 1.0)), beta=abs(options.get("beta", 1.0)))  # fmt: skip
    eps = 4 * (call.k + 4) * ACCUMULATION_EPS[call.dtype]
    if np.all(diff <= tol * np.abs(ref) + eps * bound):
        return None
    return f"relative error {err:.3g} > {tol:g} (and not within the elementwise bound)"


def run_call(call: Call) -> str | None:
    """Make the call; None when it behaved, else what went wrong."""
    fw = call.fw
    if call.expect is not None:
        out = call.kwargs.get("out")
        before = fw.snapshot(out) if out is not None else None
        try:
            matmul(*call.args, **call.kwargs)
        except errors.GemmError as error:
            if not isinstance(error, call.expect):
                return f"raised {type(error).__name__} ({error}), expected {call.expect.__name__}"
        except Exception as error:
            return f"raised {type(error).__name__} ({error}), not a GemmError"
        else:
            return f"did not raise (expected {call.expect.__name__})"
        if out is not None and fw.snapshot(out) != before:
            return "a failed call wrote into out"
        return None
    try:
        result = matmul(*call.args, **call.kwargs)
    except Exception as error:
        return f"raised {type(error).__name__}: {error}"
    return check_result(call, result)
