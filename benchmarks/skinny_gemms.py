"""Skinny (bandwidth-bound) GEMMs: torch.matmul, gemmbridge on cuBLASLt only, gemmbridge with its own kernels.

The skinny shapes (``gemmbridge.bench.presets.SKINNY``, docs/kernels.md): LoRA's five GEMMs in the layouts a layer holds
(``x·Aᵀ``, ``xa·Bᵀ``, ``dy·B``, ``dyᵀ·xa``, ``dyBᵀ·x``) at T ∈ {4096, 16384}, r ∈ {8, 16, 64}, d = 4096, and
decode steps ``x (M, d_in)·Wᵀ`` for M ∈ {1, 4, 8, 16} and W (d_out, d_in) ∈ {4096×4096, 14336×4096,
4096×14336}; bf16 and fp16 (fp32 with ``--fp32``). In one run: the device-to-device copy bandwidth (bytes read
+ written of a 1 GiB copy), then per shape every candidate checked against float64 (output poisoned first),
then timed two ways: per call (``gemmbridge bench``'s timing: do_bench medians, L2 flushed before each call,
interleaved, best of ``--rounds``), and in the steady state a training step sees on the GPU (``steady_us``: 40
calls captured back to back in a CUDA graph, cycling through input sets that together exceed the L2, the median
of 5 event-timed replays). Per
candidate: µs, GB/s of the least bytes the GEMM moves (read A and B, write D; no role reads C), % of the copy
bandwidth, ratio to torch (its time over the candidate's) — the headline figures from the steady state. The
target: gemmbridge's default (its own kernels where the measured rule takes them) at ≥ 80 % of the copy bandwidth.

    python benchmarks/skinny_gemms.py --json benchmarks/results/<date>-<card>-skinny.json   # about 2 minutes
    python benchmarks/skinny_gemms.py --quick                                              # bf16, 7 shapes

Exit status 1 when a gemmbridge candidate is wrong or fails on any shape.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import statistics
import subprocess
from collections.abc import Callable
from typing import Any

import numpy as np

import gemmbridge as gb
from gemmbridge import info
from gemmbridge.bench import candidates, data, measure, peaks, presets, report, runner, timing

SCHEMA = "gemmbridge.skinny/1"
KERNELS = hasattr(gb, "set_kernels")  # the process-wide switch of the project's own kernels (auto | on | off)
STEADY_BYTES = 160 * 2**20  # input sets cycled in the steady-state timing: together over the L2 (50 MiB on an H200)
STEADY_CALLS = 40
NO_KERNELS = "own kernels: not available (this gemmbridge has no set_kernels; gemmbridge.matmul is cuBLASLt only)"


class Kernels(candidates.Gemmbridge):
    """``gemmbridge.matmul`` with ``set_kernels(mode)``: the switch is set (and the plan cache cleared) on the
    first call after a candidate of another mode ran, outside the timed calls that follow."""

    current: str | None = None

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = f"gemmbridge-{mode}"
        what = {"off": "cuBLASLt only", "auto": "the project's own kernels where the measured rule takes them, else "
                "cuBLASLt", "on": "the project's own kernels wherever they can serve the problem"}[mode]  # fmt: skip
        self.description = f"gemmbridge.matmul, set_kernels({mode!r}): {what}"

    def _available(self, device: str) -> str | None:
        if self.mode != "off" and not KERNELS:
            return NO_KERNELS
        return super()._available(device)

    def prepare(self, a: Any, b: Any, dtype: data.DType) -> Callable[[], Any]:
        call = super().prepare(a, b, dtype)
        if not KERNELS:
            return call
        mode = self.mode

        def run() -> Any:
            if Kernels.current != mode:
                gb.set_kernels(mode)  # type: ignore[attr-defined]  (it drops matmul's cached plans)
                Kernels.current = mode
            return call()

        return run


CANDIDATES = (candidates.Torch(), Kernels("off"), Kernels("auto"), Kernels("on"))
JUDGED = "gemmbridge-auto" if KERNELS else "gemmbridge-off"  # what gemmbridge.matmul does by default


def shapes(device: str, quick: bool) -> list[presets.Shape]:
    sizes = dict(presets.SKINNY[device])
    if quick:
        sizes.update(tokens=sizes["tokens"][:1], ranks=(16,), rows=(1, 16), weights=sizes["weights"][:1])
    return presets.skinny_shapes(**sizes)


def steady_us(calls: list[Callable[[], Any]]) -> float:
    """GPU µs per call of ``STEADY_CALLS`` calls captured back to back in one torch CUDA graph, cycling through
    ``calls`` (one per input set): the GEMM as a training step runs it on the GPU, with the gaps between kernels
    and without the host's launch cost, which on the lent H200 exceeds a 32 MiB GEMM's own time."""
    turn = itertools.count()
    return timing.gpu_us_per_op(lambda: calls[next(turn) % len(calls)](), "torch", calls=STEADY_CALLS, replays=5)


def time_steady(shape: presets.Shape, dtype: data.DType, results: dict[str, Any], rng: np.random.Generator) -> None:
    """Each candidate that passed its check: ``steady_us`` over input sets of ``shape`` (``STEADY_BYTES`` in all)."""
    sets = [data.make_inputs("cuda", shape, dtype, rng) for _ in range(max(2, -(-STEADY_BYTES // shape.nbytes(
        dtype.itemsize))))]  # fmt: skip
    for cand in CANDIDATES:
        result = results.get(cand.name, {})
        if result.get("status") == "ok":
            result["steady_us"] = steady_us([cand.prepare(a, b, dtype) for a, b in sets])


def git_commit() -> dict[str, Any]:
    """The gemmbridge checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    where = os.path.dirname(os.path.abspath(gb.__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def figures(shape: presets.Shape, dtype: data.DType, results: dict[str, Any], copy: float) -> dict[str, Any]:
    """One row: each timed candidate's µs, GB/s, % of copy and ratio to torch; the target on ``JUDGED``."""
    nbytes = shape.nbytes(dtype.itemsize)
    torch_ms = results.get("torch", {}).get("ms")
    torch_steady = results.get("torch", {}).get("steady_us")
    for r in results.values():
        if r["status"] == "ok":
            r.update(flushed_us=r["ms"] * 1e3, flushed_ratio_vs_torch=torch_ms / r["ms"] if torch_ms else None)
            flushed = peaks.bandwidth_use(nbytes, r["ms"], copy)
            r.update(flushed_pct_of_copy=flushed["pct_of_copy"])
            steady = "steady_us" in r  # CUDA: the steady state; the CPU: the per-call time
            us, base = (r["steady_us"], torch_steady) if steady else (r["ms"] * 1e3, torch_ms and torch_ms * 1e3)
            r.update(us=us, ratio_vs_torch=base / us if base else None)
            r.update(peaks.bandwidth_use(nbytes, us * 1e-3, copy))
    judged = results.get(JUDGED, {})
    met = judged["pct_of_copy"] >= presets.SKINNY_TARGET_PCT if judged.get("status") == "ok" else None
    return {
        "dtype": dtype.label,
        "role": shape.role,
        "m": shape.m,
        "n": shape.n,
        "k": shape.k,
        "transpose_a": shape.transpose_a,
        "transpose_b": shape.transpose_b,
        "bytes": nbytes,
        "target_met": met,
        "results": results,
    }


def _cell(r: dict[str, Any]) -> str:
    if r["status"] == "skipped":
        return "-"
    if r["status"] != "ok":
        return r["status"].upper()
    ratio = f" {r['ratio_vs_torch']:.2f}×" if r.get("ratio_vs_torch") else ""
    return f"{r['us']:8.1f}µs {r['pct_of_copy']:4.0f}%{ratio}"


def table(doc: dict[str, Any]) -> list[str]:
    """The text table: per row each candidate's µs, % of copy, ratio to torch; the target met or missed."""
    names = [c["name"] for c in doc["candidates"]]
    head = ["dtype", "role", "M×N×K:layout", "MB", *names, f"≥{presets.SKINNY_TARGET_PCT:g}% ({JUDGED})"]
    body = []
    for row in doc["rows"]:
        target = {True: "met", False: "MISSED", None: "-"}[row["target_met"]]
        shape = f"{report.shape_text({**row, 'batch': 1})}"
        cells = [_cell(row["results"][n]) for n in names]
        body.append([row["dtype"], row["role"], shape, f"{row['bytes'] / 1e6:.1f}", *cells, target])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip() for cells in [head, *body]]


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Per gemmbridge candidate: geo-mean and least ratio to torch; targets met / judged; failures."""
    found: dict[str, Any] = {}
    for cand in doc["candidates"]:
        name = cand["name"]
        results = [(row, row["results"][name]) for row in doc["rows"]]
        ratios = [r["ratio_vs_torch"] for _, r in results if r.get("ratio_vs_torch")]
        pcts = [r["pct_of_copy"] for _, r in results if r["status"] == "ok"]
        found[name] = {
            "timed_rows": len(pcts),
            "geomean_ratio_vs_torch": math.exp(statistics.fmean(map(math.log, ratios))) if ratios else None,
            "min_ratio_vs_torch": min(ratios) if ratios else None,
            "rows_at_target": sum(p >= presets.SKINNY_TARGET_PCT for p in pcts),
            "min_pct_of_copy": min(pcts) if pcts else None,
            "failures": [f"{row['dtype']} {row['role']} {row['m']}×{row['n']}×{row['k']}: {r['reason']}"
                         for row, r in results if r["status"] in ("wrong", "error")],
        }  # fmt: skip
    judged = [row["target_met"] for row in doc["rows"] if row["target_met"] is not None]
    found["target"] = {"candidate": JUDGED, "met": sum(judged), "judged": len(judged), "rows": len(doc["rows"])}
    return found


def versions(device: str) -> dict[str, Any]:
    """gemmbridge (and its git commit), Python, the frameworks; on CUDA the driver, runtime, cuBLASLt, torch's CUDA."""
    found: dict[str, Any] = {**info.versions(), "gemmbridge_git": git_commit()}
    if device == "cuda":
        found.update(info.cuda_versions())
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="bf16, T = 4096, r = 16, decode M ∈ {1, 16}, one W")
    parser.add_argument("--fp32", action="store_true", help="float32 too (TF32 off)")
    parser.add_argument("--rep-ms", type=float, default=60.0, help="timed ms per measurement (60)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept (2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run, small sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = info.resolve_device(args.device)
    dtypes = [data.DTYPES["bf16"]] if args.quick else [data.DTYPES["bf16"], data.DTYPES["fp16"]]
    dtypes += [data.DTYPES["fp32"]] if args.fp32 else []
    active = [c for c in CANDIDATES if c.available(device) is None]
    rng = np.random.default_rng(args.seed)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "card": runner.card_name(device),
        "sm_count": None,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(device),
        "own_kernels": {"available": KERNELS, "reason": None if KERNELS else NO_KERNELS},
        "method": (
            "inputs standard normal, fresh per shape, in the layouts a LoRA layer holds; every candidate checked "
            "against float64 (output poisoned first) before timing; headline time (us, pct_of_copy, ratio_vs_torch) "
            f"on CUDA: steady state, {STEADY_CALLS} calls captured back to back in one CUDA graph cycling through "
            "input sets of 160 MiB in all, median of 5 event-timed replays; flushed_us: triton.testing.do_bench "
            f"median with the L2 flushed before each call, candidates interleaved, {args.rounds} round(s), best "
            "median kept (the headline on the CPU); bytes: the least a GEMM moves (read A and B, write D); % of "
            "copy: (bytes / time) over the copy bandwidth of the same run; ratio: torch's time over the candidate's"
        ),
        "settings": {
            "dtypes": [d.label for d in dtypes],
            "sizes": presets.SKINNY[device],
            "quick": args.quick,
            "rep_ms": args.rep_ms,
            "rounds": args.rounds,
            "seed": args.seed,
            "target_pct_of_copy": presets.SKINNY_TARGET_PCT,
            "tolerances": {d.label: d.tolerance for d in dtypes},
        },
        "candidates": [
            {"name": c.name, "description": c.description, "reason": c.available(device)} for c in CANDIDATES
        ],
        "copy_bandwidth": peaks.copy_bandwidth(device, args.rep_ms),
        "rows": [],
    }
    if device == "cuda":
        import torch

        doc["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    copy = doc["copy_bandwidth"]["bytes_per_s"]
    sms = f" ({doc['sm_count']} SMs)" if doc["sm_count"] else ""
    print(f"{doc['card']}{sms} · copy bandwidth {copy / 1e12:.3g} TB/s · {doc['date']}")
    print(f"own kernels: {'available' if KERNELS else 'not available'}", flush=True)
    for dtype in dtypes:
        for shape in shapes(device, args.quick):
            results = measure.check_and_time(device, shape, dtype, active, rng, args.rep_ms, args.rounds)
            if device == "cuda":
                time_steady(shape, dtype, results, rng)
            for cand in doc["candidates"]:
                results.setdefault(cand["name"], measure.skipped(cand["reason"]))
            doc["rows"].append(figures(shape, dtype, results, copy))
            print(f"  {dtype.label} {shape.role:12} {shape}", flush=True)
    doc["summary"] = summary(doc)
    print("\n".join(table(doc)))
    target = doc["summary"]["target"]
    print(f"target ≥ {presets.SKINNY_TARGET_PCT:g} % of copy ({JUDGED}): met on {target['met']}/{target['judged']}")
    for cand in doc["candidates"]:
        s = doc["summary"][cand["name"]]
        if cand["reason"]:
            print(f"  {cand['name']:16} skipped: {cand['reason']}")
        elif s["geomean_ratio_vs_torch"]:
            print(f"  {cand['name']:16} geo-mean {s['geomean_ratio_vs_torch']:.3f}× torch "
                  f"(min {s['min_ratio_vs_torch']:.3f}×), least {s['min_pct_of_copy']:.0f} % of copy")  # fmt: skip
        for failure in s["failures"]:
            print(f"  {cand['name']:16} FAILED {failure}")
    if args.json:
        report.write_json(doc, args.json)
        print(f"wrote {args.json}")
    return 1 if any(doc["summary"][c.name]["failures"] for c in CANDIDATES[1:]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
