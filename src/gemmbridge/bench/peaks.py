"""The card's measured limits, once per run: the best large GEMM per dtype, and copy bandwidth.

The compute peak is the best TFLOP/s that any correct candidate reaches on a large square GEMM of the
dtype (M = N = K = ``PEAK_SIZE``); a shape timed later that beats it raises it (the JSON says so). The
memory bound is device-to-device copy bandwidth, bytes read + written, of a large torch tensor copy on
CUDA or a numpy copy on the CPU. A shape's roofline is ``min(peak, bandwidth × FLOPs / bytes)``: the
shape is compute-bound when the peak is the smaller term, memory-bound otherwise; on the CPU, a shape whose
operands fit in the last-level cache is bounded by the peak alone (the copy is measured on more than the
cache). A shape's achieved bandwidth is the least bytes its GEMM must move (``Shape.nbytes``) over its time, also
given as a percentage of the copy bandwidth (the skinny target's measure).
"""

from __future__ import annotations

import contextlib
import glob
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
    results = check_and_time(device, shape, dtype, candidates, rng, rep_ms, rounds=1, max_rounds=1)  # a lower bound
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
        cache = last_level_cache_bytes()
        nbytes = min(max(nbytes, 4 * (cache or 0)), 1 << 30)  # out of cache
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
        cache = None  # the GPU's L2 is flushed before each timed call
    return {
        "bytes_per_s": 2 * nbytes / (ms * 1e-3),
        "nbytes": nbytes,
        "method": method + ", bytes read + written",
        "cache_bytes": cache,
    }


def last_level_cache_bytes() -> int | None:
    """The CPU's largest cache in bytes (Linux's /sys), None where it cannot be read."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with contextlib.suppress(OSError, ValueError):
            with open(index) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]])
    return max(sizes) if sizes else None


def roofline(
    shape: Shape, dtype: DType, peak_tflops: float | None, bytes_per_s: float | None, cache_bytes: int | None = None
) -> dict[str, Any]:
    """The shape's bound: ``min(peak, bandwidth × intensity)`` in TFLOP/s, and which term it is. Operands that fit
    in ``cache_bytes`` (the CPU's last-level cache) are not held back by the copy bandwidth, which is measured out
    of cache: their bound is the peak (``in_cache``)."""
    intensity = shape.flops / shape.nbytes(dtype.itemsize)
    in_cache = cache_bytes is not None and shape.nbytes(dtype.itemsize) <= cache_bytes
    memory = bytes_per_s * intensity / 1e12 if bytes_per_s and not in_cache else None
    found = {"intensity": intensity, "in_cache": in_cache}
    if peak_tflops is None or memory is None:
        bound = "compute" if memory is None else "memory"
        return {**found, "roofline_tflops": peak_tflops or memory, "bound": bound}
    if peak_tflops <= memory:
        return {**found, "roofline_tflops": peak_tflops, "bound": "compute"}
    return {**found, "roofline_tflops": memory, "bound": "memory"}


def bandwidth_use(nbytes: int, ms: float, copy_bytes_per_s: float | None) -> dict[str, float | None]:
    """``gb_per_s = nbytes / time / 1e9`` and ``pct_of_copy = 100 · (nbytes / time) / copy bandwidth``."""
    per_s = nbytes / (ms * 1e-3)
    return {"gb_per_s": per_s / 1e9, "pct_of_copy": 100 * per_s / copy_bytes_per_s if copy_bytes_per_s else None}
