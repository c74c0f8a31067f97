"""CUDA backend: a described problem on cuBLASLt, on the caller's stream.

``execute`` is the hot path of a GPU call: allocate the result in the caller's
framework, look the plan up by pointer alignment, and enqueue (or replay) it.
"""

from __future__ import annotations

from typing import Any

from ...arrays import ArrayAdapter
from ...errors import allocation_failed
from . import autotune, bindings, workspace
from .graphs import MAX_FLOPS, GraphCache


class PlanSet:
    """The vendor plans of one problem, keyed by pointer alignments and TF32."""

    __slots__ = ("problem", "device", "plans", "small")

    def __init__(self, problem: Any, device: int) -> None:
        self.problem = problem
        self.device = device
        self.plans: dict[tuple, tuple[bindings.LtPlan, GraphCache]] = {}
        flops = 2 * problem.m * problem.n * problem.k * len(problem.outer_offsets) * problem.batch_count
        self.small = flops <= MAX_FLOPS

    def plan(self, key: tuple) -> tuple[bindings.LtPlan, GraphCache]:
        problem = self.problem
        layouts = (problem.lt_a, problem.lt_b, problem.lt_c, problem.lt_d)
        alignments = tuple(min(p, lay.alignment) for p, lay in zip(key, layouts))
        entry = self.plans[key] = (bindings.LtPlan(self.device, problem, key[4], alignments), GraphCache())  # type: ignore[arg-type]
        return entry


def _aligned_copy(fw: ArrayAdapter, x: Any, n: int) -> Any:
    copy = fw.empty((n,), x)
    fw.copy_into(copy, x)
    return copy


def execute(
    fw: ArrayAdapter,
    plans: PlanSet,
    a: Any,
    b: Any,
    c: Any,
    bias: Any,
    out: Any,
    alpha: float,
    beta: float,
    allow_tf32: bool | None,
    pointers: tuple[int, int, int, int, int] | None = None,
) -> Any:
    """Enqueue ``plans.problem`` for these operands; return the result array. ``pointers``: the addresses of
    (a, b, c, bias, out) when the caller has read them already (0 for an absent operand)."""
    problem = plans.problem
    device = plans.device
    if out is not None and not problem.out_via_temp:
        d = out
    else:
        try:
            d = fw.empty(problem.out_shape, a)
        except (MemoryError, RuntimeError) as error:
            raise allocation_failed(
                "result", problem.out_shape, problem.dtype, problem.itemsize, problem.device, error
            ) from error
    if pointers is None:
        a_ptr, b_ptr, d_ptr = fw.pointer(a), fw.pointer(b), fw.pointer(d)
        c_ptr = 0 if c is None else fw.pointer(c)
        bias_ptr = 0 if bias is None else fw.pointer(bias)
    else:
        a_ptr, b_ptr, c_ptr, bias_ptr, out_ptr = pointers
        d_ptr = out_ptr if d is out else fw.pointer(d)
    if c is None:
        c_ptr, beta = d_ptr, 0.0
    if bias_ptr & 15:  # cuBLASLt refuses some misaligned bias vectors; N elements are cheap to copy
        bias = _aligned_copy(fw, bias, problem.n)
        bias_ptr = fw.pointer(bias)
    tf32 = problem.dtype == "float32" and (fw.default_allow_tf32() if allow_tf32 is None else bool(allow_tf32))
    # the largest power of two (at most 256) dividing each pointer, in cuBLASLt's operand order
    pb, pa, pc, pd = b_ptr | 256, a_ptr | 256, c_ptr | 256, d_ptr | 256
    key = (pb & -pb, pa & -pa, pc & -pc, pd & -pd, tf32)
    stream = fw.stream(device)
    ws = workspace.pointer(fw, device, stream, a)
    found = plans.plans.get(key)
    if found is None:
        found = plans.plan(key)
        # tuned into a contiguous scratch result: only when the result's layout is contiguous too
        if autotune.enabled and out is None and fw.finish is None and not fw.capturing(device):
            scratch = fw.empty(problem.out_shape, a)
            s_ptr = fw.pointer(scratch)
            autotune.tune(found[0], problem, a_ptr, b_ptr, s_ptr if c is None else c_ptr, s_ptr, bias_ptr,
                          alpha, beta, ws, stream)  # fmt: skip
    plan, graphs = found

    def enqueue(on: int) -> None:
        bindings.launch(plan, problem, a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, alpha, beta, ws, on)

    if not (plans.small and fw.finish is None) or not graphs.launch(
        (a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, alpha, beta, stream, ws), fw, device, stream, enqueue
    ):
        enqueue(stream)
    if fw.finish is not None:
        fw.finish(device)
    if d is not out and out is not None:
        fw.copy_into(out, d)
        return out
    return d
