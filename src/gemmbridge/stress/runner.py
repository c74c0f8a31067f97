"""The stress run, in order: the largest call per framework and dtype, one pass over the problem set, the
priming calls, then the counted calls; memory sampled after the warm-up (10 % of the counted calls), every
tenth of the run, and at the end. ``run`` returns the JSON document (schema ``gemmbridge.stress/1``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import BackendUnavailableError
from ..ops import PLAN_CACHE_SIZE, cache_size
from ..testing import Framework, Unavailable
from . import report
from .check import run_call
from .draw import Call, Drawer
from .memory import sample, tolerances
from .options import StressOptions, resolve

MAX_FAILURES_KEPT = 20
WARMUP_FRACTION = 0.1  # of the counted calls, before the first memory sample


def _frameworks(names: tuple[str, ...], device: str) -> list[Framework]:
    try:
        return [Framework(name, device) for name in names]
    except Unavailable as missing:
        raise BackendUnavailableError(f"--frameworks {','.join(names)}: {missing}") from None


class _Tally:
    """Calls made, and the failures seen (the first ``MAX_FAILURES_KEPT`` kept in full)."""

    def __init__(self) -> None:
        self.counts = {"largest": 0, "valid": 0, "checked": 0, "failing": 0}
        self.failures: list[dict[str, Any]] = []
        self.failure_count = 0

    def make(self, iteration: int, call: Call) -> None:
        kind = "largest" if iteration < 0 else "failing" if call.expect else "valid"
        self.counts[kind] += 1
        self.counts["checked"] += iteration >= 0 and bool(call.inputs64)
        problem = run_call(call)
        if problem:
            self.failure_count += 1
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append({"iteration": iteration, "call": call.text, "problem": problem})


def run(options: StressOptions) -> dict[str, Any]:
    """Run the stress test; the result's ``ok`` is False on any failure (see ``gemmbridge.stress``)."""
    plan = resolve(options)
    frameworks = _frameworks(plan.frameworks, plan.device)
    limits = tolerances(options, plan)
    for line in report.header(plan, options, limits):
        options.log(line)
    drawer = Drawer(plan.seed, frameworks, plan.max_dim, plan.problems or None)
    set_pass = 2 * plan.problems if plan.set_pass else 0
    start, end = plan.first_counted, plan.first_counted + plan.iterations
    warmup = start + min(max(1, int(plan.iterations * WARMUP_FRACTION)), plan.iterations - 1)
    every = max(1, plan.iterations // 10)
    tally = _Tally()
    samples: list[dict[str, Any]] = []
    max_cache = 0
    started = time.perf_counter()
    for fw in frameworks:  # the largest problems first: pools sized by them reach their size in the warm-up
        for dtype in fw.dtypes:
            tally.make(-1, drawer.largest(fw, dtype))
    with _progress(end, options.progress) as advance:
        for i in range(end):
            if i == warmup or (i > warmup and (i - start) % every == 0):
                samples.append({"iteration": i, **sample(plan.device, plan.frameworks, clear_jax=not set_pass)})
            checked = i < report.CHECK_FIRST or i % plan.check_every == 0
            if i < set_pass:
                tally.make(i, drawer.nth(i, checked))
            else:
                tally.make(i, drawer.failing() if i % 5 == 4 else drawer.valid(checked))
            max_cache = max(max_cache, cache_size())
            advance()
    samples.append({"iteration": end, **sample(plan.device, plan.frameworks, clear_jax=not set_pass)})
    growth = {key: samples[-1][key] - samples[0][key] for key in limits}
    over = {key: value for key, value in growth.items() if (limit := limits[key]) is not None and value > limit}
    ok = not tally.failure_count and not over and max_cache <= PLAN_CACHE_SIZE
    result = {
        "schema": "gemmbridge.stress/1",
        "ok": ok,
        "seed": plan.seed,
        "device": plan.device,
        "frameworks": list(plan.frameworks),
        "iterations": plan.iterations,
        "set_pass_calls": set_pass,
        "prime_calls": plan.prime_calls,
        "max_dim": plan.max_dim,
        "problems": plan.problems,
        "warmup_iterations": warmup,
        "seconds": time.perf_counter() - started,
        "counts": tally.counts,
        "failure_count": tally.failure_count,
        "failures": tally.failures,
        "tolerances": {**limits, "plan_cache": PLAN_CACHE_SIZE},
        "host_rss_not_judged": plan.rss_unjudged,
        "growth_after_warmup": growth,
        "over_tolerance": over,
        "plan_cache_max": max_cache,
        "samples": samples,
    }
    for line in report.summary(result):
        options.log(line)
    if options.json_path:
        report.write_json(result, options.json_path)
    return result


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr when rich is installed and stderr is a terminal."""
    bar: Any = None
    if enabled and sys.stderr.isatty():
        try:
            from rich.console import Console
            from rich.progress import Progress

            bar = Progress(console=Console(stderr=True), transient=True)
        except ImportError:
            pass
    if bar is None:
        yield lambda: None
        return
    with bar:
        task = bar.add_task("stress", total=total)
        yield lambda: bar.advance(task)
