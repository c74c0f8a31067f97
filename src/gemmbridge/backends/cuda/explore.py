"""Exploring beyond the heuristic's picks: a bounded search of cuBLASLt's algorithm space (``algos.py``).

The heuristic's eight picks gain at best a few percent over its first (+1.5–3.6 % on large bf16/fp16
shapes, H100). ``explore`` times, each briefly (``QUICK_MS``), in this order while the wall-clock
``budget_s`` lasts and at most ``MAX_CANDIDATES``:

1. the heuristic's list asked for ``HEURISTIC_WANTED`` algorithms (its first pick is the baseline);
2. the extra candidates of registered sources (``autotune.add_source``);
3. algorithm ids the heuristic did not return (``algos.unseen_ids``);
4. rounds of a local search: the configurations one change away (tile, stages, split-K and reduction,
   swizzling, cluster shape; ``algos.neighbours``) from the ``SEEDS`` fastest so far, each checked with
   ``matmul_algo_check`` first, until a round finds nothing faster.

Before anything is timed the first pick warms the GPU to steady clocks (``timer.Timer.warm``); after the
search the ``autotune.FINALISTS`` fastest and the first pick are timed again, longer, in interleaved
rounds of rotating order, and kept only by a gain beyond the run's noise (``autotune.final``). The
budget bounds the search; the warm-up and the final rounds come on top.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ...problem import Operands, Problem
from ...tuning import canonical
from . import algos, autotune
from .autotune import Candidate, LtCandidate, Tuned
from .bindings import LtPlan
from .timer import Timer

BUDGET_S = 4.0
budget_s = BUDGET_S  # the wall-clock seconds a plan's exploration may take (``gemmbridge.tune(budget_s=)``)
HEURISTIC_WANTED = 64
MAX_CANDIDATES = 256
QUICK_MS = 0.5
SEEDS = 3


def _lt(plan: LtPlan, cfgs: Iterable[algos.Config], seen: set[str]) -> Iterable[Candidate]:
    """Checked algorithms of ``plan`` for the configurations not met yet."""
    for cfg in cfgs:
        algo = algos.build(plan, cfg)
        if algo is not None:
            cand = LtCandidate(plan, algo)
            if canonical(cand.payload) not in seen:
                yield cand


def _cublaslt(timed: dict[str, tuple[Candidate, float]]) -> list[tuple[LtCandidate, float]]:
    return [(c, t) for c, t in timed.values() if isinstance(c, LtCandidate)]


def explore(
    plan: LtPlan, problem: Problem, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int,
    budget_s: float = BUDGET_S,
) -> Tuned:  # fmt: skip
    """Search, time and select (module doc); ``ptrs`` point the outputs at scratch memory."""
    first = LtCandidate(plan, plan.result(plan._results, 0), "heuristic 0", 0)
    timed: dict[str, tuple[Candidate, float]] = {}  # by canonical payload

    with Timer(ptrs, alpha, beta, workspace, stream, plan.device) as timer:
        timer.warm(first)
        deadline = time.perf_counter() + budget_s

        def run(candidates: Iterable[Candidate]) -> None:
            for cand in candidates:
                if time.perf_counter() > deadline or len(timed) >= MAX_CANDIDATES:
                    return
                key = canonical(cand.payload)
                if key not in timed:
                    timed[key] = (cand, timer.time(cand, QUICK_MS))

        timed[canonical(first.payload)] = (first, timer.time(first, QUICK_MS))  # the baseline, whatever the budget
        results, count = plan.heuristic(HEURISTIC_WANTED)
        run(LtCandidate(plan, algos.copied(plan.result(results, i)), f"heuristic list {i}") for i in range(count))
        for source in list(autotune.sources.values()):
            run(source.candidates(problem, autotune.our_alignments(plan), plan.tf32))
        ids = {dict(algos.config(c.algo))["ID"] for c, _ in _cublaslt(timed)}
        run(_lt(plan, algos.unseen_ids(plan, ids), set(timed)))
        caps: dict[int, dict] = {}
        expanded: set[algos.Config] = set()
        best = min(t for _, t in timed.values())
        while time.perf_counter() < deadline and len(timed) < MAX_CANDIDATES:
            for cand, _ in sorted(_cublaslt(timed), key=lambda v: v[1])[:SEEDS]:
                cfg = algos.config(cand.algo)
                if cfg not in expanded:
                    expanded.add(cfg)
                    run(_lt(plan, algos.neighbours(plan, cfg, caps), set(timed)))
            now = min(t for _, t in timed.values())
            if not now < best:
                break
            best = now

        baseline = timed.pop(canonical(first.payload))[1]
        candidates, screened = [first, *(c for c, _ in timed.values())], [baseline, *(t for _, t in timed.values())]
        tuned = autotune.final(timer, candidates, screened, "explore")
    return autotune.adopt(plan, tuned, first)
