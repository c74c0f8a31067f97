"""The card's measured limits, once per run: the best large GEMM per dtype, and copy bandwidth.

The compute peak is the best TFLOP/s that any correct candidate reaches on a large square GEMM of the
dtype (M = N = K = ``PEAK_SIZE``); a shape timed later that beats it raises it (the JSON says so). The
memory bound is device-to-device copy bandwidth, bytes read + written, of a large torch tensor copy on
CUDA or a numpy copy on the CPU. A shape's roofline is ``min(peak, bandwidth × FLOPs / bytes)``: the
shape is compute-bound when the peak is the smaller term, memory-bound otherwise. A shape's achieved bandwidth is
the least bytes its GEMM must move (``Shape.nbytes``) over its time, also given as a percentage of the copy
bandwidth (the skinny target's measure).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .candidates import Candidate
from .data import DType
from .measure import check_and_time
from .presets import Shape
from .timing import device_ms

COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}


def compute_peak(
    device: str, dtype: DType, candidates: list[Candidate], size: int, rng: np.random.Generator, rep_ms: float
) -> dict[str, Any]:
    """Best TFLOP/s of a size³ GEMM in ``dtype`` among the candidates (each checked first)."""
    shape = Shape(size, size, size, preset="peak")
    results = check_and_time(device, shape, dtype, candidates, rng, rep_ms, rounds=1)
    timed = {name: r["tflops"] for name, r in results.items() if r["status"] == "ok"}
    best = max(timed, key=lambda name: timed[name]) if timed else None
    return {
        "tflops": timed[best] if best else None,
        "candidate": best,
        "shape": [size, size, size],
        "by_candidate": {
            name: {"status": r["status"], "tflops": r.get("tflops"), "reason": r.get("reason")}
            for name, r in results.items()
        },
    }


def copy_bandwidth(device: str, rep_ms: float) -> dict[str, Any]:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    nbytes = COPY_BYTES[device]
    if device == "cpu":
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.empty_like(src)
        ms = device_ms(lambda: np.copyto(dst, src), device, rep_ms)
        method = f"numpy.copyto of {nbytes >> 20} MiB"
    else:
        import torch

        tsrc = torch.ones(nbytes, dtype=torch.uint8, device=device)
        tdst = torch.empty_like(tsrc)
        ms = device_ms(lambda: tdst.copy_(tsrc), device, rep_ms)
        method = f"torch Tensor.copy_ of {nbytes >> 20} MiB on the device"
    return {"bytes_per_s": 2 * nbytes / (ms * 1e-3), "nbytes": nbytes, "method": method + ", bytes read + written"}


def roofline(shape: Shape, dtype: DType, peak_tflops: float | None, bytes_per_s: float | None) -> dict[str, Any]:
    """The shape's bound: ``min(peak, bandwidth × intensity)`` in TFLOP/s, and which term it is."""
    intensity = shape.flops / shape.nbytes(dtype.itemsize)
    memory = bytes_per_s * intensity / 1e12 if bytes_per_s else None
    if peak_tflops is None or memory is None:
        bound = "compute" if memory is None else "memory"
        return {"intensity": intensity, "roofline_tflops": peak_tflops or memory, "bound": bound}
    if peak_tflops <= memory:
        return {"intensity": intensity, "roofline_tflops": peak_tflops, "bound": "compute"}
    return {"intensity": intensity, "roofline_tflops": memory, "bound": "memory"}


def bandwidth_use(nbytes: int, ms: float, copy_bytes_per_s: float | None) -> dict[str, float | None]:
    """``gb_per_s = nbytes / time / 1e9`` and ``pct_of_copy = 100 · (nbytes / time) / copy bandwidth``."""
    per_s = nbytes / (ms * 1e-3)
    return {"gb_per_s": per_s / 1e9, "pct_of_copy": 100 * per_s / copy_bytes_per_s if copy_bytes_per_s else None}
