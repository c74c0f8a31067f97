"""Opt-in autotuning: time the heuristic's candidate algorithms once per plan, keep the fastest.

cuBLASLt's heuristic first pick is not always the fastest (DESIGN.md: fp16 8192³ at
0.96× torch). With autotuning on (``gemmbridge.set_autotune(True)`` or
``GEMMBRIDGE_AUTOTUNE=1``), the first call of each new plan runs every candidate a
few times on the caller's stream into a scratch result and waits for the GPU once
to read the timings; later calls pay nothing. It is skipped while the caller's
stream is being captured into a CUDA graph.
"""

from __future__ import annotations

import os

from cuda.bindings import driver

from ...errors import VendorError
from ...problem import Problem
from .bindings import LtPlan, launch
from .graphs import _check

MEASURE_MS = 2.0  # GPU time to spend timing each candidate (at least 3 calls, at most 200)
MARGIN = 0.98  # a candidate replaces the heuristic's first pick only when at least 2 % faster
enabled = os.environ.get("GEMMBRIDGE_AUTOTUNE", "0") == "1"


def tune(
    plan: LtPlan, problem: Problem, a: int, b: int, c: int, scratch: int, bias: int, alpha: float, beta: float,
    workspace: int, stream: int,
) -> list[float]:  # fmt: skip
    """Select ``plan``'s fastest candidate; returns each candidate's ms per call (inf if refused)."""
    start = _check(driver.cuEventCreate(0))
    end = _check(driver.cuEventCreate(0))
    times: list[float] = []
    try:
        for index in range(plan.candidates):
            plan.select(index)
            try:
                launch(plan, problem, a, b, c, scratch, bias, alpha, beta, workspace, stream)  # warm-up
            except VendorError:
                times.append(float("inf"))
                continue
            if plan.choice != index:  # refused and fell back: not this candidate's timing
                times.append(float("inf"))
                continue
            repeats = 3
            for _ in range(2):  # a short estimate, then about MEASURE_MS worth of calls
                _check(driver.cuEventRecord(start, stream))
                for _ in range(repeats):
                    launch(plan, problem, a, b, c, scratch, bias, alpha, beta, workspace, stream)
                _check(driver.cuEventRecord(end, stream))
                _check(driver.cuEventSynchronize(end))
                per_call = _check(driver.cuEventElapsedTime(start, end)) / repeats
                repeats = max(3, min(200, int(MEASURE_MS / max(per_call, 1e-3))))
            times.append(per_call)
    finally:
        driver.cuEventDestroy(start)
        driver.cuEventDestroy(end)
    best = min(range(len(times)), key=times.__getitem__)
    plan.select(best if times[best] < MARGIN * times[0] else 0)
    return times
