"""gemmbridge vs torch.matmul on one CUDA card: TFLOP/s per dtype and shape, and host µs per call.

Candidates: torch.matmul; gemmbridge with the heuristic's first pick (tuning cache off); gemmbridge
autotuned in process over the heuristic's candidates (cache off); gemmbridge with the tuning cache
filled by ``gemmbridge.tune`` (exploring cuBLASLt's algorithms) for the shape just before it is
timed. The tuning cache is a fresh temporary directory unless GEMMBRIDGE_CACHE_DIR is set. Every
candidate is checked against a float64 reference before it is timed, and all candidates are timed in
the same run, interleaved (A B C D A B C D, best median of each kept). Writes a JSON naming the card,
date, versions, every candidate, the ratios to torch and their geo-means.

    python benchmarks/matmul_vs_torch.py --json benchmarks/results/<date>-<card>-matmul.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
import triton.testing

import gemmbridge as gb
from gemmbridge import tuning
from gemmbridge.backends.cuda import bindings
from gemmbridge.bench import data

SHAPES = [(1024, 1024, 1024), (4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 4096), (2048, 11008, 4096)]
LABELS = ("bf16", "fp16", "tf32", "fp32")
CANDIDATES = ("gemmbridge", "gemmbridge-autotuned", "gemmbridge-tuned", "torch")
RATIOS = {"ratio": "gemmbridge", "ratio_autotuned": "gemmbridge-autotuned", "ratio_tuned": "gemmbridge-tuned"}


def prepare(name: str) -> None:
    """A fresh plan: the heuristic's first pick, autotuned in process, or from the tuning cache."""
    gb.set_autotune(name == "gemmbridge-autotuned")
    tuning.enabled = name == "gemmbridge-tuned"
    gb.clear_cache()


def time_tflops(fn, flops: int) -> float:
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return flops / (ms * 1e-3) / 1e12


def bench_shape(label: str, m: int, n: int, k: int, budget_s: float) -> dict:
    dtype = data.torch_dtype(data.DTYPES[label])
    tf32 = label == "tf32"
    tuning.enabled = True
    (tuned,) = gb.tune([f"{m}x{n}x{k}"], dtype=label, budget_s=budget_s)  # fills the cache for this shape
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(k, n, device="cuda", dtype=dtype)
    ref = a.double() @ b.double()
    gemm = lambda: gb.matmul(a, b, allow_tf32=tf32)  # noqa: E731
    candidates = {"gemmbridge": gemm, "gemmbridge-autotuned": gemm, "gemmbridge-tuned": gemm,
                  "torch": lambda: torch.matmul(a, b)}  # fmt: skip
    row: dict = {"dtype": label, "m": m, "n": n, "k": k, "tuning": {"first_ms": tuned.first_ms,
                 "tuned_ms": tuned.tuned_ms, "chosen": tuned.chosen, "candidates": tuned.candidates}}  # fmt: skip
    for name, fn in candidates.items():
        prepare(name)
        err = data.rel_err(fn(), ref, "cuda")
        row[f"{name}_rel_err"] = err
        if not err < data.DTYPES[label].tolerance:
            raise SystemExit(f"{name} is wrong for {label} {m}x{n}x{k}: rel err {err:.2e}")
        if name == "gemmbridge-tuned":
            (plan,) = gb.plan.PLANS.plans.values()
            ((lt, _, _),) = plan.state.plans.values()
            row["tuned_plan_from_cache"] = lt.choice == -1  # restored from the cache, not the heuristic's list
    del ref
    flops = 2 * m * n * k
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(2):
        for name, fn in candidates.items():
            prepare(name)
            runs[name].append(time_tflops(fn, flops))
    for name, values in runs.items():
        row[f"{name}_tflops"] = max(values)
        row[f"{name}_tflops_runs"] = values
    for key, name in RATIOS.items():
        row[key] = row[f"{name}_tflops"] / row["torch_tflops"]
    torch.backends.cuda.matmul.allow_tf32 = False
    return row


def host_us_per_call(fn, calls: int = 5000, repeats: int = 7) -> list[float]:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return samples


def bench_host(n: int = 64) -> dict:
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    ref = a.double() @ b.double()
    assert data.rel_err(gb.matmul(a, b, allow_tf32=False), ref, "cuda") < data.DTYPES["fp32"].tolerance
    gb.set_autotune(False)
    tuning.enabled = False
    candidates = {"gemmbridge": lambda: gb.matmul(a, b, allow_tf32=False), "torch": lambda: torch.matmul(a, b)}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(2):
        for name, fn in candidates.items():
            samples[name] += host_us_per_call(fn)
    row: dict[str, Any] = {"shape": [n, n, n], "dtype": "fp32"}
    for name, values in samples.items():
        row[f"{name}_us"] = statistics.median(values)
        row[f"{name}_us_samples"] = values
    row["ratio"] = row["gemmbridge_us"] / row["torch_us"]
    return row


def versions() -> dict:
    import nvmath

    return {
        "gemmbridge": gb.__version__,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cublasLt": bindings.version(),
        "nvmath-python": nvmath.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of exploring per shape (gemmbridge.tune)")
    parser.add_argument("--dtypes", default=",".join(LABELS), help="comma list of " + ", ".join(LABELS))
    args = parser.parse_args()
    labels = [t for t in args.dtypes.split(",") if t]
    if set(labels) - set(LABELS):
        raise SystemExit(f"--dtypes: choose from {', '.join(LABELS)}")
    if not os.environ.get("GEMMBRIDGE_CACHE_DIR"):
        os.environ["GEMMBRIDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemmbridge-bench-tuning-")
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "method": "triton.testing.do_bench median (L2 flushed per run), candidates interleaved, best of 2 rounds; "
        "gemmbridge-tuned: gemmbridge.tune (exploring, budget below) then a fresh plan from the tuning cache; "
        "host: 5000 eager calls without sync then one sync, 7 repeats x 2 rounds, median",
        "candidates": list(CANDIDATES),
        "tune_budget_s": args.budget,
        "tuning_cache": os.environ["GEMMBRIDGE_CACHE_DIR"],
        "gemm": [],
    }
    for label in labels:
        for m, n, k in SHAPES:
            if label == "fp32" and m * n * k > 4096**3:
                continue
            row = bench_shape(label, m, n, k, args.budget)
            result["gemm"].append(row)
            print(
                f"{label:5} {m:6}x{n:6}x{k:6}  gemmbridge {row['gemmbridge_tflops']:7.1f}  "
                f"tuned {row['gemmbridge-tuned_tflops']:7.1f}  torch {row['torch_tflops']:7.1f} TFLOP/s  "
                f"ratio {row['ratio']:.3f}  tuned {row['ratio_tuned']:.3f}  ({row['tuning']['chosen']})",
                flush=True,
            )
    result["host"] = bench_host()
    h = result["host"]
    print(
        f"host fp32 64^3: gemmbridge {h['gemmbridge_us']:.2f} us/call, torch {h['torch_us']:.2f} us/call, "
        f"ratio {h['ratio']:.3f}"
    )
    for key in RATIOS:
        ratios = [row[key] for row in result["gemm"]]
        result[f"geomean_{key}"] = statistics.geometric_mean(ratios)
        result[f"min_{key}"] = min(ratios)
        print(f"{key}: geo-mean {result[f'geomean_{key}']:.3f}, min {min(ratios):.3f}")
    square = [r for r in result["gemm"] if r["dtype"] == "bf16" and r["m"] == r["n"] == r["k"] == 4096]
    if square:
        result["bf16_4096_tuned_tflops"] = square[0]["gemmbridge-tuned_tflops"]
        print(f"bf16 4096^3 tuned: {result['bf16_4096_tuned_tflops']:.1f} TFLOP/s (target on an H100: 790)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
