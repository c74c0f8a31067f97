"""One shape in one dtype: fresh inputs, every candidate checked against float64, then the correct ones timed.

A candidate that is wrong (relative error over the dtype's tolerance, or NaN) or that raises is reported
with the reason and is not timed. Timing interleaves the candidates (A B C A B C) and keeps each one's best
median, repeating rounds until each one's best two agree (``timing.settle``; one that never does is marked
unstable); a small shape also gets host µs per call (on the CPU: the timed time per call itself) and, on CUDA,
GPU µs per op replayed from a CUDA graph (a candidate that cannot be captured keeps its timings, with the reason
under ``gpu_us_reason``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .candidates import Candidate
from .data import DType, make_inputs, poison, reference, rel_err
from .presets import Shape
from .timing import MAX_ROUNDS, MAX_SPREAD, device_ms, gpu_us_per_op, host_us_per_call, settle, spread


def _error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def check_and_time(
    device: str,
    shape: Shape,
    dtype: DType,
    candidates: list[Candidate],
    rng: np.random.Generator,
    rep_ms: float,
    rounds: int,
    max_rounds: int = MAX_ROUNDS,
    max_spread: float = MAX_SPREAD,
) -> dict[str, dict[str, Any]]:
    """Each candidate's result on ``shape``: status, reason, rel_err, ms (the best of ``ms_runs``), spread, stable,
    tflops, host_us, gpu_us. Timing rounds: ``timing.settle``."""
    results: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    graph = {cand.name: cand.graph for cand in candidates}
    uncaptured = {cand.name: cand.uncaptured for cand in candidates}
    with contextlib.ExitStack() as stack:
        a, b = make_inputs(device, shape, dtype, rng)
        ref = reference(a, b, device)
        for cand in candidates:
            reason = cand.unsupported(shape, dtype)
            if reason:
                results[cand.name] = skipped(reason)
                continue
            try:
                fn = cand.prepare(a, b, dtype)
                close = getattr(fn, "close", None)
                if close is not None:
                    stack.callback(close)
                poison(device, shape, dtype)
                err = rel_err(fn(), ref, device)
            except Exception as error:
                results[cand.name] = {"status": "error", "reason": _error(error)}
                continue
            if not err <= dtype.tolerance:  # NaN is wrong too
                reason = f"relative error {err:.2e} over the {dtype.label} tolerance {dtype.tolerance:g}"
                results[cand.name] = {"status": "wrong", "reason": reason, "rel_err": err}
                continue
            results[cand.name] = {"status": "ok", "reason": None, "rel_err": err, "ms_runs": []}
            fns[cand.name] = fn
        del ref

        def measure(name: str) -> float:
            try:
                return device_ms(fns[name], device, rep_ms)
            except Exception as error:
                results[name] = {"status": "error", "reason": _error(error), "rel_err": results[name]["rel_err"]}
                return math.nan

        for name, times in settle(list(fns), measure, rounds, max_rounds, max_spread).items():
            if results[name]["status"] == "ok":
                results[name]["ms_runs"] = times
            else:
                del fns[name]
        for name, fn in list(fns.items()):
            result = results[name]
            result["ms"] = min(result["ms_runs"])
            result["spread"] = spread(result["ms_runs"])
            result["stable"] = None if result["spread"] is None else result["spread"] <= max_spread
            result["tflops"] = shape.flops / (result["ms"] * 1e-3) / 1e12
            result["host_us"] = result["gpu_us"] = None
            if not shape.small:
                continue
            if device == "cpu":  # the time per call: the timed measurement itself, not a second one to disagree
                result["host_us"] = result["ms"] * 1e3
                continue
            try:
                result["host_us"] = host_us_per_call(fn, device, budget_ms=rep_ms)
            except Exception as error:
                results[name] = {"status": "error", "reason": _error(error), "rel_err": result["rel_err"]}
                continue
            if device == "cuda":
                captured_by = graph[name]
                if captured_by is None:
                    result["gpu_us_reason"] = f"not captured in a CUDA graph: {uncaptured[name]}"
                    continue
                try:
                    result["gpu_us"] = gpu_us_per_op(fn, captured_by)
                except Exception as error:
                    result["gpu_us_reason"] = f"not captured in a CUDA graph: {_error(error)}"
    return results
