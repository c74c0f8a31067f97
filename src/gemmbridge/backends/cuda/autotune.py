"""Tuning a plan: time candidate ways to compute it on the caller's stream, keep the fastest only when it is.

cuBLASLt's heuristic first pick is not always the fastest (fp16 8192³ measured at 0.96× torch).
With autotuning on (``gemmbridge.set_autotune(True)`` or ``GEMMBRIDGE_AUTOTUNE=1``), the first call
of each new plan times the heuristic's candidates; ``gemmbridge.tune`` explores further
(``explore.py``). Candidates run on the caller's stream, writing only scratch buffers laid out like
the call's outputs, timed with CUDA events; later calls, in every thread, pay nothing. Nothing is
timed while the caller's stream is being captured into a CUDA graph.

How a choice is made (``final`` and ``decide``), so that a tuned choice is never slower than the
first pick it replaces:

1. steady clocks first: the first pick runs back to back (``timer.Timer.warm``) until its time per
   call settles — an idle GPU boosts its clock, and whatever is timed before it falls to its power
   cap looks ~10 % faster than it is;
2. a screening pass times every candidate once (``timer.MEASURE_MS``);
3. the first pick and the ``FINALISTS`` fastest others are timed again in ``ROUNDS`` interleaved
   rounds, each timing every finalist once, the order rotated by one each round (none always first);
4. per finalist, the ratio of its time to the first pick's in the same round: its gain is
   ``1 − median``, the run's noise the ratios' range (max − min). The finalist of largest gain
   replaces the first pick only when ``gain > max(MIN_GAIN, noise)``; otherwise the first pick stays.

A candidate is anything with a ``name``, a JSON ``payload`` (``{"backend": ..., ...}``, what the
tuning cache keeps) and ``launch(ptrs, alpha, beta, workspace, stream)``; cuBLASLt algorithms are
``LtCandidate``s, and other backends (the project's own kernels) add theirs through a ``Source``
registered with ``add_source``.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...errors import GemmError
from ...problem import Operands, Problem
from . import algos, bindings
from .bindings import LtPlan
from .timer import Timer

MIN_GAIN = 0.02  # a candidate replaces the heuristic's first pick only when at least 2 % faster, and beyond the noise
FINALISTS = 4  # the fastest candidates of the screening timed again against the first pick
ROUNDS = 5
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


@dataclass(frozen=True)
class Decision:
    """What ``decide`` found: the finalist chosen (0: the first pick), its gain over the first pick and the noise."""

    chosen: int
    gain: float
    noise: float


def decide(rounds: Sequence[Sequence[float]], min_gain: float = MIN_GAIN) -> Decision:
    """``rounds[r][i]``: finalist ``i``'s ms per call in round ``r`` (finalist 0 is the first pick; inf: it failed).

    Per finalist, the ratio to the first pick in the same round: gain ``1 − median``, noise ``max − min``; the
    finalist of largest gain is chosen when ``gain > max(min_gain, noise)``. A first pick that failed in every round
    gives way to the finalist of lowest median time."""
    inf = float("inf")
    first = [r[0] for r in rounds]
    if all(t == inf for t in first):
        medians = [statistics.median(r[i] for r in rounds) for i in range(len(rounds[0]))]
        best = min(range(len(medians)), key=medians.__getitem__)
        return Decision(best, 1.0 if medians[best] < inf else 0.0, 0.0)
    found = Decision(0, -inf, 0.0)  # the best finalist so far
    for i in range(1, len(rounds[0])):
        ratios = [r[i] / r[0] for r in rounds if r[0] < inf]
        if any(x == inf for x in ratios):
            continue  # it failed in a round: never chosen
        gain, noise = 1.0 - statistics.median(ratios), max(ratios) - min(ratios)
        if gain > found.gain:
            found = Decision(i, gain, noise)
    if found.gain == -inf:
        return Decision(0, 0.0, 0.0)
    return found if found.gain > max(min_gain, found.noise) else Decision(0, found.gain, found.noise)


@dataclass
class Tuned:
    """What a tuning chose: the candidate; the first pick's and the choice's median ms per call in the final rounds
    and the noise of their ratio (``decide``); every candidate's screening time and every finalist's rounds."""

    chosen: Candidate
    first_ms: float
    chosen_ms: float
    method: str  # "heuristic" or "explore"
    timings: dict[str, float] = field(default_factory=dict)
    noise: float = 0.0
    rounds: dict[str, list[float]] = field(default_factory=dict)


def final(timer: Timer, candidates: Sequence[Candidate], screened: Sequence[float], method: str) -> Tuned:
    """Steps 3 and 4 of the module doc: ``candidates[0]`` is the first pick, ``screened`` their screening times."""
    inf = float("inf")
    others = sorted((i for i in range(1, len(candidates)) if screened[i] < inf), key=screened.__getitem__)
    finalists = [candidates[0]] + [candidates[i] for i in others[:FINALISTS]]
    rounds = []
    for r in range(ROUNDS):
        times = [inf] * len(finalists)
        for j in range(len(finalists)):
            i = (r + j) % len(finalists)  # round r starts with finalist r
            times[i] = timer.time(finalists[i])
        rounds.append(times)
    decision = decide(rounds)
    by_name = {c.name: [r[i] for r in rounds] for i, c in enumerate(finalists)}

    def median(i: int) -> float:
        return float(statistics.median(r[i] for r in rounds))

    timings = {c.name: t for c, t in zip(candidates, screened)}
    return Tuned(finalists[decision.chosen], median(0), median(decision.chosen), method, timings, decision.noise,
                 by_name)  # fmt: skip


def tune(
    plan: LtPlan, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int, problem: Problem
) -> Tuned:
    """Time the heuristic's candidates and the registered sources' (``add_source``) as the module doc says; a
    cuBLASLt choice becomes the plan's algorithm.

    ``ptrs`` must point the outputs (d, aux in a forward epilogue, bias_grad) at scratch memory.
    """
    heuristic = heuristic_candidates(plan)
    candidates: list[Candidate] = list(heuristic)
    for source in list(sources.values()):
        candidates += source.candidates(problem, our_alignments(plan), plan.tf32)
    with Timer(ptrs, alpha, beta, workspace, stream, plan.device) as timer:
        timer.warm(heuristic[0])
        tuned = final(timer, candidates, [timer.time(c) for c in candidates], "heuristic")
    return adopt(plan, tuned, heuristic[0])


def adopt(plan: LtPlan, tuned: Tuned, first: LtCandidate) -> Tuned:
    """A cuBLASLt choice becomes the plan's algorithm; with another backend's the plan keeps its first pick (timing
    left it on whichever algorithm ran last)."""
    chosen = tuned.chosen
    (chosen if isinstance(chosen, LtCandidate) else first).apply(plan)
    return tuned
