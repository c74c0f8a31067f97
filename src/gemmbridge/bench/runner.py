"""``gemmbridge bench``: measure the card's limits, then every shape × dtype for every candidate.

``run(options)`` returns the JSON-ready result (schema in ``report.py``). All candidates run in the same
process on the same inputs; a candidate that cannot run is listed with the reason, in the candidate list
and in every row, never dropped.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import OptionError
from ..info import resolve_device
from ..progress import Progress
from . import report
from .candidates import BASELINES, Candidate, candidates
from .data import DType, parse_dtypes
from .measure import check_and_time, skipped
from .peaks import bandwidth_use, compute_peak, copy_bandwidth, roofline
from .presets import DEFAULT_PRESETS, PEAK_SIZE, SKINNY_TARGET_PCT, Shape, parse_shape, preset_shapes
from .timing import GRAPH_CALLS, GRAPH_REPLAYS, MAX_ROUNDS, MAX_SPREAD

DEFAULT_DTYPE = {"cuda": "bf16", "cpu": "fp32"}
DEFAULT_REP_MS = {"cuda": 60.0, "cpu": 25.0}
METHOD = (
    "inputs standard normal, fresh per shape; each candidate checked against a float64 reference before it is "
    "timed; device time: {timer}, warm-up excluded; candidates interleaved A B C A B C, at least {rounds} round(s), "
    "then more rounds (at most {max_rounds} in all) for each candidate whose best two medians differ by more than "
    "{max_spread:g} %, best median kept, marked unstable if they still differ; host µs/call (small shapes): {host}; "
    "{gpu}"
)
HOST_METHOD = {
    "cuda": "eager calls without synchronization, then one, median of 5",
    "cpu": "the timed time per call itself (on the CPU there is nothing to wait for)",
}
GPU_METHOD = {
    "cuda": "GPU µs/op (small shapes): {calls} calls captured in one CUDA graph (torch's; CuPy's for cupy), "
    "median of {replays} event-timed replays / {calls}",
    "cpu": "GPU µs/op: not applicable on the CPU",
}


@dataclass
class BenchOptions:
    device: str | None = None  # "cpu" or "cuda"; None: cuda when torch sees one
    dtypes: str | None = None  # comma list of bf16, fp16, tf32, fp32, fp64
    presets: str | None = None  # comma list of square, llm, lora, small, skinny, all
    shapes: list[str] = field(default_factory=list)  # MxNxK[xBATCH]
    candidates: str | None = None  # comma list to keep; the others are listed as not selected
    rep_ms: float | None = None  # timed milliseconds per measurement
    rounds: int = 2  # at least
    max_rounds: int = MAX_ROUNDS  # in all, for a candidate whose best two times differ by more than max_spread
    max_spread: float = 100 * MAX_SPREAD  # percent
    peak_size: int | None = None
    seed: int = 0
    progress: bool = True


def card_name(device: str) -> str:
    if device == "cuda":
        import torch

        return str(torch.cuda.get_device_name(0))
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"CPU: {model} ({os.cpu_count()} logical cores)"


@contextlib.contextmanager
def _tf32(device: str, dtype: DType) -> Iterator[None]:
    """torch's own TF32 setting for its float32 matmul, for one dtype's block on CUDA (restored after:
    ``gemmbridge.arrays.torch.tf32_setting``); other dtypes leave it as it is."""
    if device != "cuda" or dtype.name != "float32":
        yield
        return
    from ..arrays.torch import tf32_setting

    with tf32_setting(dtype.tf32):
        yield


def _select(device: str, names: str | None) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """The candidates that will run, and every candidate's listing (with the reason for those that won't)."""
    every = candidates()
    wanted = None
    if names:
        wanted = {n.strip() for n in names.split(",") if n.strip()}
        unknown = wanted - {c.name for c in every}
        if unknown:
            raise OptionError(f"--candidates: unknown {sorted(unknown)} (choose from {[c.name for c in every]})")
    active, listing = [], []
    for cand in every:
        reason = cand.available(device)
        if reason is None and wanted is not None and cand.name not in wanted:
            reason = "not selected (--candidates)"
        if reason is None:
            active.append(cand)
        listing.append({
            "name": cand.name,
            "description": cand.description,
            "available": reason is None,
            "reason": reason,
            "baseline": cand.name == BASELINES[device][0],
        })  # fmt: skip
    if not active:
        reasons = "; ".join(f"{c['name']}: {c['reason']}" for c in listing if wanted is None or c["name"] in wanted)
        raise OptionError(f"--candidates {names}: none can run on {device} ({reasons})" if names else
                          f"no candidate can run on {device} ({reasons})")  # fmt: skip
    return active, listing


def _versions(device: str) -> dict[str, Any]:
    from ..info import cuda_versions, versions

    found: dict[str, Any] = dict(versions())
    if device == "cuda":
        found.update(cuda_versions())
    return found


ENV_PREFIXES = (
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "GOTO_",
    "CUPY_TF32",
    "NVIDIA_TF32_OVERRIDE",
    "CUBLAS",
    "CUDA_VISIBLE_DEVICES",
    "GEMMBRIDGE_",
)


def load_average() -> float | None:
    """The host's 1-minute load average (None where the OS has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def busy_note(loads: list[float | None], cores: int | None) -> str | None:
    """A note when other work kept the host's cores busy while timing (load average over half the cores)."""
    seen = [load for load in loads if load is not None]
    if not seen or not cores or max(seen) <= cores / 2:
        return None
    return (f"the host was busy: load average up to {max(seen):.1f} on {cores} cores while timing; timings include "
            "other processes' work (see the unstable cells)")  # fmt: skip


def _environment() -> dict[str, Any]:
    """What else shapes the numbers: thread counts and the variables that change BLAS or TF32 behaviour."""
    found: dict[str, Any] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    found["cpu_count"] = os.cpu_count()
    found["load_average"] = [load_average()]  # at the start; the end's is added after the run
    from .. import tuning

    found["tuning_cache"] = tuning.cache_dir() if tuning.enabled else "off"  # tuned choices a GPU plan may use
    with contextlib.suppress(ImportError):
        import torch

        found["torch_threads"] = torch.get_num_threads()
    return found


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; the result is the JSON document (see ``report.SCHEMA``)."""
    device = resolve_device(options.device)
    dtypes = parse_dtypes(options.dtypes or DEFAULT_DTYPE[device])
    notes = []
    if device == "cpu" and any(d.tf32 for d in dtypes):
        notes.append("tf32 skipped: TF32 is a CUDA tensor-core mode; there is none on the CPU")
        dtypes = [d for d in dtypes if not d.tf32]
    if not dtypes:
        raise OptionError("no dtype left to run on the CPU (tf32 is CUDA only)")
    custom = [parse_shape(s) for s in options.shapes]
    shapes = custom
    if options.presets or not custom:
        names = options.presets.split(",") if options.presets else list(DEFAULT_PRESETS)
        shapes = preset_shapes(device, names) + custom
    rep_ms = DEFAULT_REP_MS[device] if options.rep_ms is None else options.rep_ms
    peak_size = PEAK_SIZE[device] if options.peak_size is None else options.peak_size
    rounds = options.rounds
    for flag, value in {"--rep-ms": rep_ms, "--rounds": rounds, "--peak-size": peak_size}.items():
        if not value > 0:  # NaN too
            raise OptionError(f"{flag} {value:g}: a positive number")
    if options.seed < 0:
        raise OptionError(f"--seed {options.seed}: at least 0")
    if not options.max_spread > 0:
        raise OptionError(f"--max-spread {options.max_spread:g}: a positive percentage")
    if not options.max_rounds >= rounds:
        raise OptionError(f"--max-rounds {options.max_rounds}: at least --rounds ({rounds})")
    settling: dict[str, Any] = {"max_rounds": options.max_rounds, "max_spread": options.max_spread / 100}
    active, listing = _select(device, options.candidates)
    unavailable = {c["name"]: c["reason"] for c in listing if not c["available"]}
    rng = np.random.default_rng(options.seed)

    timer = "time.perf_counter loops, median"
    if device == "cuda":
        timer = "CUDA events around each call, median"
        with contextlib.suppress(ImportError):
            import triton.testing  # noqa: F401

            timer = "triton.testing.do_bench median (L2 flushed before each call)"
    result: dict[str, Any] = {
        "schema": report.SCHEMA,
        "card": card_name(device),
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(device),
        "method": METHOD.format(
            timer=timer,
            rounds=rounds,
            max_rounds=options.max_rounds,
            max_spread=options.max_spread,
            host=HOST_METHOD[device],
            gpu=GPU_METHOD[device].format(calls=GRAPH_CALLS, replays=GRAPH_REPLAYS),
        ),
        "settings": {
            "dtypes": [d.label for d in dtypes],
            "presets": sorted({s.preset for s in shapes}),
            "rep_ms": rep_ms,
            "rounds": rounds,
            "max_rounds": options.max_rounds,
            "max_spread_pct": options.max_spread,
            "peak_size": peak_size,
            "seed": options.seed,
            "tolerances": {d.label: d.tolerance for d in dtypes},
        },
        "notes": notes,
        "environment": _environment(),
        "candidates": listing,
        "peaks": {},
        "bandwidth": None,
        "rows": [],
    }
    with Progress(1 + len(dtypes) * (1 + len(shapes)), options.progress) as progress:
        progress.step("copy bandwidth")
        result["bandwidth"] = copy_bandwidth(device, rep_ms)
        progress.advance()
        for dtype in dtypes:
            with _tf32(device, dtype):
                progress.step(f"{dtype.label} peak {peak_size}³")
                peak = compute_peak(device, dtype, active, peak_size, rng, rep_ms)
                peak["measured_tflops"] = peak["tflops"]
                result["peaks"][dtype.label] = peak
                progress.advance()
                for shape in shapes:
                    progress.step(f"{dtype.label} {shape}")
                    measured = check_and_time(device, shape, dtype, active, rng, rep_ms, rounds, **settling)
                    by_name = {c["name"]: measured.get(c["name"]) or skipped(unavailable[c["name"]]) for c in listing}
                    result["rows"].append(_row(shape, dtype, by_name))
                    progress.advance()
    result["environment"]["load_average"].append(load_average())
    note = busy_note(result["environment"]["load_average"], os.cpu_count())
    result["notes"] += [note] if note else []
    _finish(result, device, dtypes)
    return result


def _row(shape: Shape, dtype: DType, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "preset": shape.preset,
        "dtype": dtype.label,
        "m": shape.m,
        "n": shape.n,
        "k": shape.k,
        "batch": shape.batch,
        "transpose_a": shape.transpose_a,
        "transpose_b": shape.transpose_b,
        "role": shape.role,
        "flops": shape.flops,
        "bytes": shape.nbytes(dtype.itemsize),
        "target_pct_of_copy": SKINNY_TARGET_PCT if shape.preset == "skinny" else None,
        "results": results,
    }


def _finish(result: dict[str, Any], device: str, dtypes: list[DType]) -> None:
    """Peaks raised to the best seen, then each row's roofline, % of it, bandwidth used (and the skinny target met or
    not), and ratio to the framework's matmul (the row's baseline); the summary's geo-means, one per baseline, over
    the rows where the candidate and the baseline were stable."""
    bandwidth, cache = result["bandwidth"]["bytes_per_s"], result["bandwidth"]["cache_bytes"]
    for dtype in dtypes:
        peak = result["peaks"][dtype.label]
        for row in result["rows"]:
            for name, r in row["results"].items():
                if row["dtype"] == dtype.label and r["status"] == "ok" and r["tflops"] > (peak["tflops"] or 0):
                    peak.update(tflops=r["tflops"], candidate=name, shape=[row["m"], row["n"], row["k"]])
        peak["raised_by_a_timed_shape"] = peak["tflops"] != peak["measured_tflops"]
    dtype_of = {d.label: d for d in dtypes}
    for row in result["rows"]:
        dtype = dtype_of[row["dtype"]]
        shape = Shape(row["m"], row["n"], row["k"], row["batch"], row["preset"])
        row.update(roofline(shape, dtype, result["peaks"][dtype.label]["tflops"], bandwidth, cache))
        ok = {name: r for name, r in row["results"].items() if r["status"] == "ok"}
        row["baseline"] = next((name for name in BASELINES[device] if name in ok), None)
        base = ok[row["baseline"]] if row["baseline"] else None
        for r in ok.values():
            # (the ratio first: the cell that set the peak is exactly 100 %, never a rounding over it)
            r["pct_of_roofline"] = 100 * (r["tflops"] / row["roofline_tflops"]) if row["roofline_tflops"] else None
            r["ratio"] = r["tflops"] / base["tflops"] if base else None
            r["ratio_stable"] = None if base is None else r["stable"] is not False and base["stable"] is not False
            r.update(bandwidth_use(row["bytes"], r["ms"], bandwidth))
            target = row["target_pct_of_copy"]
            r["target_met"] = None if target is None or r["pct_of_copy"] is None else r["pct_of_copy"] >= target
    summary: dict[str, Any] = {}
    for cand in result["candidates"]:
        name = cand["name"]
        ratios: dict[str, list[float]] = {}  # by baseline: a geo-mean never mixes two
        unstable = 0
        for row in result["rows"]:
            r = row["results"][name]
            if not r.get("ratio") or row["baseline"] == name:
                continue
            if r["ratio_stable"]:
                ratios.setdefault(row["baseline"], []).append(r["ratio"])
            else:
                unstable += 1
        failed = [
            f"{label} peak {'x'.join(map(str, peak['shape']))}: {peak['by_candidate'][name]['reason']}"
            for label, peak in result["peaks"].items()
            if peak["by_candidate"].get(name, {}).get("status") in ("wrong", "error")
        ]
        failed += [
            f"{row['dtype']} {report.shape_text(row)}: {row['results'][name]['reason']}"
            for row in result["rows"]
            if row["results"][name]["status"] in ("wrong", "error")
        ]
        summary[name] = {
            "timed_rows": sum(row["results"][name]["status"] == "ok" for row in result["rows"]),
            "baseline_rows": sum(row["baseline"] == name for row in result["rows"]),
            "ratios": {
                base: {"rows": len(got), "geomean": math.exp(sum(map(math.log, got)) / len(got)), "min": min(got)}
                for base, got in ratios.items()
            },
            "unstable_rows": unstable,
            "targets_met": sum(row["results"][name].get("target_met") is True for row in result["rows"]),
            "targets_missed": sum(row["results"][name].get("target_met") is False for row in result["rows"]),
            "failures": failed,
        }
    result["summary"] = summary
