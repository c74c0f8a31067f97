"""Opt-in autotuning: time the heuristic's candidate algorithms once per plan, keep the fastest.

cuBLASLt's heuristic first pick is not always the fastest (fp16 8192³ measured at 0.96× torch).
With autotuning on (``gemmbridge.set_autotune(True)`` or ``GEMMBRIDGE_AUTOTUNE=1``), the first call
of each new plan runs every candidate a few times on the caller's stream, writing only scratch
buffers laid out like the call's outputs, and waits for the GPU once to read the timings; later
calls, in every thread, pay nothing. It is skipped while the caller's stream is being captured
into a CUDA graph.
"""

from __future__ import annotations

import os

from cuda.bindings import driver

from ...errors import VendorError
from ...problem import Operands
from .bindings import LtPlan, launch
from .graphs import check

MEASURE_MS = 2.0  # GPU time to spend timing each candidate (at least 3 calls, at most 200)
MARGIN = 0.98  # a candidate replaces the heuristic's first pick only when at least 2 % faster
enabled = os.environ.get("GEMMBRIDGE_AUTOTUNE", "0") == "1"


def tune(plan: LtPlan, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int) -> list[float]:
    """Select ``plan``'s fastest candidate; returns each candidate's ms per call (inf if refused).

    ``ptrs`` must point the outputs (d, aux in a forward epilogue, bias_grad) at scratch memory.
    """
    start = check(driver.cuEventCreate(0), "cuEventCreate")
    end = check(driver.cuEventCreate(0), "cuEventCreate")
    times: list[float] = []
    try:
        for index in range(plan.candidates):
            plan.select(index)
            try:
                launch(plan, ptrs, alpha, beta, workspace, stream)  # warm-up
            except VendorError:
                times.append(float("inf"))
                continue
            if plan.choice != index:  # refused and fell back: not this candidate's timing
                times.append(float("inf"))
                continue
            repeats = 3
            for _ in range(2):  # a short estimate, then about MEASURE_MS worth of calls
                check(driver.cuEventRecord(start, stream), "cuEventRecord")
                for _ in range(repeats):
                    launch(plan, ptrs, alpha, beta, workspace, stream)
                check(driver.cuEventRecord(end, stream), "cuEventRecord")
                check(driver.cuEventSynchronize(end), "cuEventSynchronize")
                per_call = check(driver.cuEventElapsedTime(start, end), "cuEventElapsedTime") / repeats
                repeats = max(3, min(200, int(MEASURE_MS / max(per_call, 1e-3))))
            times.append(per_call)
    finally:
        driver.cuEventDestroy(start)
        driver.cuEventDestroy(end)
    best = min(range(len(times)), key=times.__getitem__)
    plan.select(best if times[best] < MARGIN * times[0] else 0)
    return times
