"""What ``gemmbridge stress`` prints: the plan before the run, the summary and verdict after it, and its JSON."""

from __future__ import annotations

import json
from typing import Any

from ..ops import PLAN_CACHE_SIZE
from .memory import ALLOCATORS, MIB, mib
from .options import Plan, StressOptions

CHECK_FIRST = 50  # calls all checked against float64 before checking every --check-every'th


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def header(plan: Plan, options: StressOptions, limits: dict[str, int | None]) -> list[str]:
    """The lines before the run: what is called, how it is drawn, what is judged and against what."""
    drawn = f"a set of {plan.problems} problems (fresh data each call)" if plan.problems else "a new problem each call"
    replay = "" if plan.problems == StressOptions.problems else f" --problems {plan.problems}"
    lines = [
        f"gemmbridge stress: {plan.iterations} calls on {plan.device} ({', '.join(plan.frameworks)}), {drawn}, "
        f"dims up to {plan.max_dim}, seed {plan.seed} (replay: --seed {plan.seed}{replay})"
    ]
    judged = []
    if set(limits) & set(ALLOCATORS.values()):
        judged.append("framework allocator growth 0 B")
    if "device_used" in limits:
        judged.append(f"device memory in use (cudaMemGetInfo) growth ≤ {options.device_tolerance_mb:g} MiB")
    if limits["host_rss"] is not None:
        judged.append(f"host RSS growth ≤ {options.rss_tolerance_mb:g} MiB")
    lines.append("tolerances after warm-up: " + ", ".join([*judged, f"plan cache ≤ {PLAN_CACHE_SIZE}"]))
    if limits["host_rss"] is None:
        lines.append(f"host RSS is reported, not judged: {plan.rss_unjudged}")
    every = "every call" if plan.check_every == 1 else f"every {ordinal(plan.check_every)} call"
    lines.append(f"results checked against float64: the first {CHECK_FIRST} calls, then {every}")
    if plan.set_pass:
        lines.append(
            f"first one pass over the set ({plan.problems} valid and {plan.problems} failing problems, each once), so "
            "that every per-shape cache (JAX's compiled executables, the plan cache, CUDA's kernels) has met them"
        )
    if plan.prime_calls:
        lines.append(
            f"{'then' if plan.set_pass else 'first'} {plan.prime_calls} priming calls (drawn and checked alike), so "
            "that the CUDA libraries' own per-kernel state has settled before the warm-up sample"
        )
    return lines


def summary(result: dict[str, Any]) -> list[str]:
    """The lines after the run: counts, memory against its tolerances, failures, and the verdict."""
    counts = result["counts"]
    parts = [f"{counts['largest']} of the largest size"]
    parts += [f"{result['set_pass_calls']} in the pass over the set"] if result["set_pass_calls"] else []
    parts += [f"{result['prime_calls']} priming"] if result["prime_calls"] else []
    lines = [
        f"calls: {', '.join(parts)}, {result['iterations']} counted; after the largest, {counts['valid']} valid "
        f"({counts['checked']} checked against float64) and {counts['failing']} failing (each must raise a "
        f"GemmError); {result['seconds']:.1f} s"
    ]
    first, last = result["samples"][0], result["samples"][-1]
    lines.append(f"memory, call {first['iteration']} (after warm-up) → call {last['iteration']} (end):")
    for key, limit in result["tolerances"].items():
        if key == "plan_cache":
            state = "ok" if result["plan_cache_max"] <= limit else "OVER"
            lines.append(
                f"  {'plan cache':16} {first['plan_cache']} → {last['plan_cache']}, at most "
                f"{result['plan_cache_max']} (bound {limit})  {state}"
            )
            continue
        grew = result["growth_after_warmup"][key]
        if limit is None:
            allowed, state = "not judged", "-"
        else:
            allowed, state = f"tolerance {mib(limit).lstrip('+')}", "OVER" if key in result["over_tolerance"] else "ok"
        lines.append(f"  {key:16} {first[key] / MIB:.2f} → {last[key] / MIB:.2f} MiB ({mib(grew)}, {allowed})  {state}")
    for failure in result["failures"]:
        lines.append(f"  FAILED at call {failure['iteration']}: {failure['call']}\n    {failure['problem']}")
    if result["failure_count"] > len(result["failures"]):
        lines.append(f"  ... and {result['failure_count'] - len(result['failures'])} more failures")
    verdict = "PASS" if result["ok"] else f"FAIL ({result['failure_count']} failed calls, over tolerance: "
    verdict += "" if result["ok"] else f"{sorted(result['over_tolerance']) or 'none'})"
    lines.append(f"stress {verdict} (seed {result['seed']})")
    return lines


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
