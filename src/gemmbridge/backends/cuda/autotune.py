"""Tuning a plan: time candidate ways to compute it on the caller's stream, keep the fastest.

cuBLASLt's heuristic first pick is not always the fastest (fp16 8192³ measured at 0.96× torch).
With autotuning on (``gemmbridge.set_autotune(True)`` or ``GEMMBRIDGE_AUTOTUNE=1``), the first call
of each new plan times the heuristic's candidates; ``gemmbridge.tune`` explores further
(``explore.py``). Candidates run a few times each on the caller's stream, writing only scratch
buffers laid out like the call's outputs, timed with CUDA events (one wait for the GPU per
measurement); later calls, in every thread, pay nothing. Nothing is timed while the caller's stream
is being captured into a CUDA graph.

The dispatch rule (``pick``): the fastest candidate replaces the heuristic's first pick only when
``t_best < MARGIN · t_first``; otherwise the first pick stays.

A candidate is anything with a ``name``, a JSON ``payload`` (``{"backend": ..., ...}``, what the
tuning cache keeps) and ``launch(ptrs, alpha, beta, workspace, stream)``; cuBLASLt algorithms are
``LtCandidate``s, and other backends (the project's own kernels) add theirs through a ``Source``
registered with ``add_source``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cuda.bindings import driver

from ...errors import GemmError
from ...problem import Operands, Problem
from . import algos, bindings, graphs
from .bindings import LtPlan
from .graphs import check

MEASURE_MS = 2.0  # GPU time to spend timing each candidate (at least 3 calls, at most 200)
MARGIN = 0.98  # a candidate replaces the heuristic's first pick only when at least 2 % faster
GRAPH_BELOW_MS = 0.05  # per-call times below this are measured again as CUDA-graph replays (Timer)
GRAPH_LAUNCHES = 20
enabled = os.environ.get("GEMMBRIDGE_AUTOTUNE", "0") == "1"
exploring = False  # set by ``gemmbridge.tune``: explore beyond the heuristic, and re-tune problems already cached
# told of each tuning: the problem described, the result, and a callable that forgets its cache entry
on_tuned: Callable[[str, Tuned, Callable[[], None]], None] | None = None

Launch = Callable[[Operands, float, float, int, int], None]


@dataclass(frozen=True, eq=False)
class Candidate:
    """One way to compute a plan's product.

    ``launch(ptrs, alpha, beta, workspace, stream)`` enqueues ``D = epilogue(alpha·op(a)·op(b) + beta·c + bias)``
    on ``stream``; ``ptrs`` are our operands' device addresses (``problem.Operands``: a, b, c, d, bias, aux,
    bias_grad, 0 when absent, in the caller's row-major terms) and ``workspace`` a 32 MiB device buffer.
    ``payload`` is the JSON-able choice the tuning cache keeps, ``{"backend": <name>, ...}``.
    """

    name: str
    payload: dict[str, Any]
    launch: Launch


class Source(Protocol):
    """Extra candidates for the tuner, from another backend (``add_source``).

    ``candidates`` offers this backend's candidates for a problem (none when it cannot compute it);
    ``restore`` rebuilds one from a payload the tuning cache kept (None when it no longer applies).
    ``alignments`` are the byte alignments of our a, b, c, d pointers the plan was made for.
    """

    backend: str

    def candidates(
        self, problem: Problem, alignments: tuple[int, int, int, int], tf32: bool
    ) -> Iterable[Candidate]: ...

    def restore(
        self, problem: Problem, alignments: tuple[int, int, int, int], tf32: bool, payload: dict[str, Any]
    ) -> Candidate | None: ...


sources: dict[str, Source] = {}


def add_source(source: Source) -> None:
    """Offer ``source``'s candidates to every tuning from now on, and let cached choices of its backend be used."""
    if source.backend == "cublaslt":
        raise ValueError("add_source: 'cublaslt' is the built-in backend")
    sources[source.backend] = source


def remove_source(backend: str) -> None:
    sources.pop(backend, None)


class Refused(GemmError):
    """The library refused a candidate at launch (the plan fell back to another algorithm)."""


class LtCandidate(Candidate):
    """A cuBLASLt algorithm of ``plan`` (``index``: its place in the plan's heuristic list, -1 if not there)."""

    algo: Any
    index: int

    def __init__(self, plan: LtPlan, algo: Any, label: str = "", index: int = -1) -> None:
        payload = algos.payload(algo)
        named = algos.named(tuple(payload["config"].items()))
        name = f"{label}: {named}" if label else named

        def launch(ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int) -> None:
            if plan.algo is not algo:
                plan.use(algo)
            bindings.launch(plan, ptrs, alpha, beta, workspace, stream)
            if plan.algo is not algo:
                raise Refused(f"cuBLASLt refused {name}")

        super().__init__(name, payload, launch)
        object.__setattr__(self, "algo", algo)
        object.__setattr__(self, "index", index)

    def apply(self, plan: LtPlan) -> None:
        """Make this algorithm ``plan``'s choice."""
        if self.index >= 0:
            plan.select(self.index)
        else:
            plan.use(self.algo)


def our_alignments(plan: LtPlan) -> tuple[int, int, int, int]:
    """The plan's pointer alignments in bytes for our a, b, c, d (cuBLASLt's A is our b)."""
    b, a, c, d = plan.alignments
    return a, b, c, d


def heuristic_candidates(plan: LtPlan) -> list[LtCandidate]:
    """The algorithms the plan's heuristic returned, its first pick first."""
    return [LtCandidate(plan, plan.result(plan._results, i), f"heuristic {i}", i) for i in range(plan.candidates)]


def pick(times: Sequence[float], baseline: int = 0, margin: float = MARGIN) -> int:
    """The fastest candidate when ``t_best < margin · t_baseline``, else ``baseline``."""
    best = min(range(len(times)), key=times.__getitem__)
    return best if times[best] < margin * times[baseline] else baseline


class Timer:
    """CUDA-event timing of candidates on one stream, into scratch outputs (``ptrs``).

    A candidate faster than ``GRAPH_BELOW_MS`` per call is host-bound when launched call by call (the
    host's launch rate, not the kernel, would be measured): it is timed again as replays of a CUDA graph
    of ``GRAPH_LAUNCHES`` calls, captured on a private stream (``graphs``)."""

    def __init__(self, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int, device: int) -> None:
        self.args = (ptrs, alpha, beta, workspace, stream)
        self.stream, self.device = stream, device
        self._held = contextlib.ExitStack()

    def __enter__(self) -> Timer:
        """Events made; the waits for them isolated from other threads' captures (``graphs.isolated``)."""
        held = self._held
        held.enter_context(graphs.isolated(driver))
        self.start = check(driver.cuEventCreate(0), "cuEventCreate")
        held.callback(driver.cuEventDestroy, self.start)
        self.end = check(driver.cuEventCreate(0), "cuEventCreate")
        held.callback(driver.cuEventDestroy, self.end)
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def _per_call(self, enqueue: Callable[[], None], budget_ms: float) -> float:
        """ms per ``enqueue()``: a short estimate, then about ``budget_ms`` worth of calls (3 to 200)."""
        repeats = 3
        for _ in range(2):
            check(driver.cuEventRecord(self.start, self.stream), "cuEventRecord")
            for _ in range(repeats):
                enqueue()
            check(driver.cuEventRecord(self.end, self.stream), "cuEventRecord")
            check(driver.cuEventSynchronize(self.end), "cuEventSynchronize")
            per_call = check(driver.cuEventElapsedTime(self.start, self.end), "cuEventElapsedTime") / repeats
            repeats = max(3, min(200, int(budget_ms / max(per_call, 1e-3))))
        return float(per_call)

    def time(self, candidate: Candidate, budget_ms: float = MEASURE_MS) -> float:
        """``candidate``'s ms per call (after a warm-up); inf if it fails."""
        launch, (ptrs, alpha, beta, workspace, stream) = candidate.launch, self.args
        try:
            launch(ptrs, alpha, beta, workspace, stream)  # warm-up
        except GemmError:
            return float("inf")
        per_call = self._per_call(lambda: launch(ptrs, alpha, beta, workspace, stream), budget_ms)
        if per_call >= GRAPH_BELOW_MS:
            return per_call

        def calls(on: int) -> None:
            for _ in range(GRAPH_LAUNCHES):
                launch(ptrs, alpha, beta, workspace, on)

        try:
            graph = graphs.capture(self.device, calls)
        except GemmError:
            return per_call
        try:
            return self._per_call(lambda: graphs._launch(graph, stream), budget_ms) / GRAPH_LAUNCHES
        finally:
            driver.cuGraphExecDestroy(graph[0])


@dataclass
class Tuned:
    """What a tuning chose: the candidate, the heuristic first pick's and the choice's ms per call, every timing."""

    chosen: Candidate
    first_ms: float
    chosen_ms: float
    method: str  # "heuristic" or "explore"
    timings: dict[str, float] = field(default_factory=dict)


def tune(
    plan: LtPlan, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int, problem: Problem
) -> Tuned:
    """Time the heuristic's candidates and the registered sources' (``add_source``) and select the one ``pick``
    chooses; a cuBLASLt choice becomes the plan's algorithm.

    ``ptrs`` must point the outputs (d, aux in a forward epilogue, bias_grad) at scratch memory.
    """
    candidates: list[Candidate] = list(heuristic_candidates(plan))
    for source in list(sources.values()):
        candidates += source.candidates(problem, our_alignments(plan), plan.tf32)
    with Timer(ptrs, alpha, beta, workspace, stream, plan.device) as timer:
        times = [timer.time(c) for c in candidates]
    chosen = pick(times)
    picked = candidates[chosen]
    if isinstance(picked, LtCandidate):
        picked.apply(plan)
    return Tuned(candidates[chosen], times[0], times[chosen], "heuristic",
                 {c.name: t for c, t in zip(candidates, times)})  # fmt: skip
