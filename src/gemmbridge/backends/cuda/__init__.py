"""CUDA backend: a described problem on cuBLASLt, on the caller's stream.

``run`` is the hot path of a GPU call: allocate the outputs in the caller's framework, pick the
vendor plan by pointer alignment and TF32, and enqueue (or replay) it. Everything it needs of the
caller's framework comes from the call's ``CallContext`` (stream, capture state, TF32 policy,
allocator) and the operands' addresses from the ``TensorView``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from cuda.bindings import driver

from ... import epilogues, tuning
from ...arrays import CallContext, TensorView
from ...errors import OptionError, allocation_failed
from ...problem import ITEMSIZE, Operands, Problem
from . import autotune, bindings, explore, graphs, kernels, layouts, tuning_cache, workspace  # noqa: F401 (layouts)
from .graphs import MAX_FLOPS, GraphCache
from .layouts import lt_problem

_AUX_ALIGNMENT = 16  # bytes cuBLASLt needs of the aux and bias-gradient pointers
_SCRATCH_SLACK = 256  # bytes of a tuning scratch beyond what the product writes: d keeps its alignment in it
_new = tuple.__new__  # Operands(...) without NamedTuple's slower constructor (hot path)


def described(problem: Problem) -> str:
    """The problem as error messages name it."""
    mixed = "" if problem.result_dtype == problem.dtype else f"→{problem.result_dtype}"
    return (
        f"{problem.dtype}{mixed} m={problem.m} n={problem.n} k={problem.k} batch={problem.batch_shape} "
        f"epilogue={problem.epilogue} bias={problem.has_bias} on {problem.device}"
    )


class PlanState:
    """The vendor plans of one problem on one device, keyed by pointer alignments and TF32; shared by threads."""

    __slots__ = ("problem", "lt", "device", "plans", "small", "fp32", "aux_padded", "lock", "described", "kernel")

    def __init__(self, problem: Problem, device: int) -> None:
        kind = epilogues.TABLE[problem.epilogue]
        if kind.aux_in != "none" and problem.k == 1:
            raise OptionError(
                f"matmul: {described(problem)} — cuBLASLt's {problem.epilogue} epilogue needs K ≥ 2 (K = 1 here)"
            )
        self.problem = problem
        self.lt = lt_problem(problem)
        self.device = device
        self.plans: dict[tuple, tuple[bindings.LtPlan, GraphCache, Any]] = {}  # (plan, graphs, its launch)
        self.small = problem.flops <= MAX_FLOPS
        self.fp32 = problem.dtype == "float32"  # TF32 is a question for float32 only
        # an aux it allocates with padding is zeroed first: outputs deterministic to the byte
        self.aux_padded = kind.aux_out != "none" and epilogues.aux_is_padded(problem.epilogue, problem.n)
        self.lock = threading.Lock()
        self.described = described(problem)
        self.kernel = kernels.config_for(problem, device)  # the project's own kernel, where it serves

    def plan(
        self, key: tuple, view: TensorView, ctx: CallContext, ptrs: Operands, alpha: float, beta: float, ws: int
    ) -> tuple[bindings.LtPlan, GraphCache, Any]:
        """The plan for pointer alignments and TF32 ``key`` with its graphs and launch, made the first time: the
        tuning cache's choice when it has one, else tuned when tuning is on, else the skinny kernel where the
        dispatch rule takes it (every pointer 16-byte aligned), else the heuristic's first pick."""
        with self.lock:
            found = self.plans.get(key)
            if found is not None:
                return found
            lt = self.lt
            alignments = tuple(min(p, lay.alignment) for p, lay in zip(key, (lt.a, lt.b, lt.c, lt.d)))
            plan = bindings.LtPlan(self.device, lt, key[4], alignments, self.described)  # type: ignore[arg-type]
            launch = None
            if tuning.enabled and not autotune.exploring:
                launch = tuning_cache.restore(plan, self.problem, self.device)
            if launch is None and (autotune.enabled or autotune.exploring) and ctx.finish is None and not ctx.capturing:
                launch = self._tune(plan, view, ctx, ptrs, alpha, beta, ws)
            if launch is None and self.kernel is not None and min(key[:4]) >= 16:
                own = kernels.plan_for(self.kernel, self.problem, self.device, self.described)
                launch = None if own is None else tuning_cache.launcher(own)
            found = self.plans[key] = (plan, GraphCache(), launch or bindings.launch)
        return found

    def _tune(
        self, plan: bindings.LtPlan, view: TensorView, ctx: CallContext, ptrs: Operands, alpha: float, beta: float,
        ws: int,
    ) -> Any:  # fmt: skip
        """Time candidates writing scratch buffers laid out like this call's outputs; keep the choice in the tuning
        cache; return its launch."""
        problem = self.problem
        lo, hi = _written_bytes(problem)
        scratch = [ctx.empty((hi - lo + _SCRATCH_SLACK,), "uint8")]
        start = view.pointer(scratch[0]) - lo  # d here puts the lowest byte written at the scratch's first
        d = start + (ptrs.d - start) % _SCRATCH_SLACK  # d's own alignment, the highest byte still inside
        aux, bias_grad = ptrs.aux, ptrs.bias_grad
        if epilogues.TABLE[problem.epilogue].aux_out != "none":
            scratch.append(ctx.empty(problem.aux_shape or (), problem.aux_dtype))
            aux = view.pointer(scratch[-1])
        if problem.bias_grad_length:
            scratch.append(ctx.empty((problem.bias_grad_length,), problem.result_dtype))
            bias_grad = view.pointer(scratch[-1])
        c = d if ptrs.c == ptrs.d else ptrs.c
        tuned_ptrs = ptrs._replace(c=c, d=d, aux=aux, bias_grad=bias_grad)
        if autotune.exploring:
            tuned = explore.explore(plan, problem, tuned_ptrs, alpha, beta, ws, ctx.stream, explore.budget_s)
        else:
            tuned = autotune.tune(plan, tuned_ptrs, alpha, beta, ws, ctx.stream, problem)
        if tuning.enabled:
            tuning_cache.store(plan, self.device, tuned, self.described)
        if autotune.on_tuned is not None:
            autotune.on_tuned(self.described, tuned, lambda: tuning_cache.forget(plan, self.device))
        chosen = tuned.chosen
        return bindings.launch if isinstance(chosen, autotune.LtCandidate) else tuning_cache.launcher(chosen)

    def close(self) -> None:
        for plan, graph_cache, _ in self.plans.values():
            graph_cache.close()
            plan.close()
        self.plans.clear()


def _written_bytes(problem: Problem) -> tuple[int, int]:
    """The bytes a product writes around d's address, (lowest, one past the highest): out's own range when the call
    writes out in place, else the contiguous result's (a fresh result, or the temporary an out= with a layout the
    library cannot describe is written through)."""
    if problem.byte_extents.d is not None and not problem.out_via_temp:
        return problem.byte_extents.d
    return 0, math.prod(problem.out_shape) * problem.result_itemsize


def _empty(
    ctx: CallContext, shape: tuple[int, ...], dtype: str, what: str, problem: Problem, zero: bool = False
) -> Any:
    try:
        return ctx.zeros(shape, dtype) if zero else ctx.empty(shape, dtype)
    except (MemoryError, RuntimeError) as error:
        raise allocation_failed(what, shape, dtype, ITEMSIZE[dtype], problem.device, error) from error


def _aligned_copy(ctx: CallContext, x: Any, n: int, dtype: str) -> Any:
    copy = ctx.empty((n,), dtype)
    ctx.copy_into(copy, x)
    return copy


_threads = threading.local()  # the devices whose primary context this thread has made current


def ensure_context(device: int) -> None:
    """Make ``device``'s primary context current on this thread, once per thread and device: the driver calls of a
    launch (the workspace's allocation, the own kernels, graph capture) need one, and a thread that has made no CUDA
    runtime call yet — the one autograd runs a backward on, say — has none."""
    ready = getattr(_threads, "devices", None)
    if ready is None:
        ready = _threads.devices = set()
    if device in ready:
        return
    current = graphs.check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if not int(current):
        primary = graphs.check(driver.cuDevicePrimaryCtxRetain(graphs.check(driver.cuDeviceGet(device), "cuDeviceGet")),
                               "cuDevicePrimaryCtxRetain")  # fmt: skip
        graphs.check(driver.cuCtxSetCurrent(primary), "cuCtxSetCurrent")
    ready.add(device)


def run(
    state: PlanState,
    view: TensorView,
    ctx: CallContext,
    a: Any,
    b: Any,
    c: Any,
    out: Any,
    bias: Any,
    aux: Any,
    bias_grad: Any,
    ptrs: Operands | None,
    alpha: float,
    beta: float,
    allow_tf32: bool | None,
) -> tuple[Any, Any, Any]:
    """Enqueue ``state.problem`` for these framework arrays; return (result, aux, bias_grad).

    ``ptrs``: the operands' addresses when the caller has read them already (0 for an absent one).
    Outputs not given are allocated by the caller's framework.
    """
    problem = state.problem
    ensure_context(state.device)
    d = (
        out
        if out is not None and not problem.out_via_temp
        else _empty(ctx, problem.out_shape, problem.result_dtype, "result", problem)
    )
    if aux is None and problem.aux_shape is not None:
        aux = _empty(ctx, problem.aux_shape, problem.aux_dtype, "aux", problem, zero=state.aux_padded)
    if bias_grad is None and problem.bias_grad_length:
        bias_grad = _empty(ctx, (problem.bias_grad_length,), problem.result_dtype, "bias_grad", problem)
    pointer = view.pointer
    if ptrs is None:
        pa, pb, pd = pointer(a), pointer(b), pointer(d)
        pc = pd if c is None else pointer(c)
        pbias = 0 if bias is None else pointer(bias)
        paux = 0 if aux is None else pointer(aux)
        pgrad = 0 if bias_grad is None else pointer(bias_grad)
    else:
        pa, pb, pc, pd, pbias, paux, pgrad = ptrs
        if d is not out:
            pd = pointer(d)
        if c is None:
            pc = pd
        if aux is not None and not paux:
            paux = pointer(aux)
        if bias_grad is not None and not pgrad:
            pgrad = pointer(bias_grad)
    if c is None:
        beta = 0.0
    if pbias & 15:  # cuBLASLt refuses some misaligned bias vectors; N elements are cheap to copy
        bias = _aligned_copy(ctx, bias, problem.n, problem.result_dtype)  # held until the call is enqueued
        pbias = pointer(bias)
    if (paux | pgrad) & (_AUX_ALIGNMENT - 1):
        raise OptionError(
            f"matmul: {state.described} — cuBLASLt needs aux and bias_grad at {_AUX_ALIGNMENT}-byte aligned addresses"
        )
    tf32 = state.fp32 and (ctx.tf32() if allow_tf32 is None else allow_tf32)
    # the largest power of two (at most 256) dividing each pointer, in cuBLASLt's operand order (A is our b)
    xb, xa, xc, xd = pb | 256, pa | 256, pc | 256, pd | 256
    key = (xb & -xb, xa & -xa, xc & -xc, xd & -xd, tf32)
    ptrs = _new(Operands, (pa, pb, pc, pd, pbias, paux, pgrad))
    stream = ctx.stream
    workspace_buffer, ws = workspace.pointer(view, ctx)  # held until the call is enqueued
    try:
        found = state.plans.get(key)
        if found is None:
            found = state.plan(key, view, ctx, ptrs, alpha, beta, ws)
        plan, graph_cache, launch = found
        if state.small and graphs.enabled and ctx.finish is None and not ctx.capturing:
            signature = (ptrs, alpha, beta, stream, ws)
            if not graph_cache.replay(signature, stream) and not graph_cache.record(
                signature, state.device, stream, lambda on: launch(plan, ptrs, alpha, beta, ws, on)
            ):
                launch(plan, ptrs, alpha, beta, ws, stream)
        else:
            launch(plan, ptrs, alpha, beta, ws, stream)
    finally:  # dropped here even when the call fails: a traceback kept by the caller would hold it, to be freed
        del workspace_buffer  # into its stream later, from any thread, maybe while that stream is being captured
    if ctx.finish is not None:
        ctx.finish()
    if d is not out and out is not None:
        ctx.copy_into(out, d)
        d = out
    return d, aux, bias_grad


def prefers_own_launch(problem: Problem, device: int) -> bool:
    """True when gemmbridge may launch something else than the framework's own GEMM would for ``problem``: the
    project's kernel serves it, tuning is on, or the tuning cache holds choices for this device."""
    if autotune.enabled or kernels.config_for(problem, device) is not None:
        return True
    return tuning.enabled and tuning_cache.has_entries(device)


def release(state: PlanState) -> None:
    """Free a plan's vendor objects; graph executables wait for ``graphs.drain``."""
    state.close()


def drain() -> None:
    """Destroy what waits for a moment outside any capture (graph executables, ended captures' workspaces)."""
    graphs.drain()
    workspace.release_finished_captures()
