"""gemmbridge vs torch.matmul on one CUDA card, at steady clocks: GPU time and wall time per call, and host µs.

Candidates: torch.matmul; gemmbridge with the heuristic's first pick (tuning cache off); gemmbridge
autotuned in process over the heuristic's candidates (cache off); gemmbridge with the tuning cache
filled by ``gemmbridge.tune`` (exploring cuBLASLt's algorithms) for the shape just before it is
timed. The tuning cache is a fresh temporary directory unless GEMMBRIDGE_CACHE_DIR is set.

How it measures (docs/tuning.md says why):

- the GPU is first warmed to its power cap: an idle H200 boosts to ~1980 MHz and falls to ~1650 at
  its ~690 W cap within a second of load, so whatever is timed first looks ~10 % faster;
- every candidate is checked against a float64 reference first, then timed in ``--rounds`` rounds,
  each timing every candidate once, the order rotated by one each round;
- GPU time: replays of a CUDA graph of the candidate's calls (no host in it), event-timed; wall
  time: the same calls launched back to back, then one sync. A row whose wall time exceeds its GPU
  time by more than ``HOST_BOUND`` is host-bound for that candidate, and named so;
- the SM clock and power are sampled (NVML through nvidia-ml-py, else ``nvidia-smi``) while each row
  is timed, and reported with it: an absolute TFLOP/s figure is quoted with its clock.

The JSON names the card, date, versions, clocks, every candidate's rounds, the ratios to torch and
their geo-means (on GPU time, over the rows that are not host-bound).

    python benchmarks/matmul_vs_torch.py --budget 2 --json benchmarks/results/<date>-<card>-matmul.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import gemmbridge as gb
from gemmbridge import tuning
from gemmbridge.bench import data, timing

SHAPES = [(1024, 1024, 1024), (4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 4096), (2048, 11008, 4096)]
LABELS = ("bf16", "fp16", "tf32", "fp32")
CANDIDATES = ("gemmbridge", "gemmbridge-autotuned", "gemmbridge-tuned", "torch")
RATIOS = {"ratio": "gemmbridge", "ratio_autotuned": "gemmbridge-autotuned", "ratio_tuned": "gemmbridge-tuned"}
HOST_BOUND = 1.10  # wall time over GPU time beyond which a row is host-bound
TIMED_MS = 50.0  # GPU time per measurement (GPU time and wall time each)


# -- the pure parts (tested on the CPU: tests/test_tuning_bench.py) ------------------------------------------------
def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated so that round r starts with the r-th."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def spread(values: Sequence[float]) -> float:
    """(max − min) / median: the relative spread of a candidate's rounds."""
    return (max(values) - min(values)) / statistics.median(values)


def judge(row: dict, gpu: dict[str, list[float]], wall: dict[str, list[float]]) -> dict:
    """``row`` with each candidate's medians, spreads and TFLOP/s, whether it is host-bound (wall time over GPU time
    beyond ``HOST_BOUND``), the ratios to torch (GPU time and wall time), and the tuned choice against the first pick:
    ``tuned_slower`` when tuned runs slower than untuned by more than their rounds' spread."""
    flops = 2 * row["m"] * row["n"] * row["k"]
    row["host_bound"] = {}
    for cand in gpu:
        g, w = statistics.median(gpu[cand]), statistics.median(wall[cand])
        row[f"{cand}_gpu_ms"], row[f"{cand}_wall_ms"] = g, w
        row[f"{cand}_gpu_ms_rounds"], row[f"{cand}_wall_ms_rounds"] = gpu[cand], wall[cand]
        row[f"{cand}_gpu_spread"] = spread(gpu[cand])
        row[f"{cand}_tflops"] = flops / (g * 1e-3) / 1e12
        row[f"{cand}_wall_tflops"] = flops / (w * 1e-3) / 1e12
        row["host_bound"][cand] = w > HOST_BOUND * g
    for key, cand in RATIOS.items():
        row[key] = row["torch_gpu_ms"] / row[f"{cand}_gpu_ms"]
        row[f"{key}_wall"] = row["torch_wall_ms"] / row[f"{cand}_wall_ms"]
    row["tuned_vs_untuned"] = row["gemmbridge_gpu_ms"] / row["gemmbridge-tuned_gpu_ms"]
    row["tuned_noise"] = max(row["gemmbridge_gpu_spread"], row["gemmbridge-tuned_gpu_spread"])
    row["tuned_slower"] = row["tuned_vs_untuned"] < 1.0 - row["tuned_noise"]
    return row


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Geo-means and minima of each ratio to torch (on GPU time) over the rows where no candidate is host-bound; the
    host-bound rows and those where the tuned choice ran slower than the first pick beyond the noise, by name."""
    kept = [r for r in rows if not any(r["host_bound"].values())]
    found: dict[str, Any] = {
        "host_bound_rows": [r["name"] for r in rows if any(r["host_bound"].values())],
        "tuned_slower_rows": [r["name"] for r in rows if r["tuned_slower"]],
    }
    for key in RATIOS:
        ratios = [r[key] for r in kept]
        found[f"geomean_{key}"] = statistics.geometric_mean(ratios) if ratios else None
        found[f"min_{key}"] = min(ratios) if ratios else None
    return found


# -- clocks ------------------------------------------------------------------------------------------------------
class Clocks:
    """SM clock (MHz) and power (W) of the GPU, sampled in a thread while ``sampling()``; NVML, else nvidia-smi."""

    def __init__(self, index: int) -> None:
        self.index, self.nvml, self.handle = index, None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
            self.source = "NVML (nvidia-ml-py)"
        except Exception:  # no nvidia-ml-py, or no NVML
            self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "none"

    def read(self) -> tuple[float, float] | None:
        """(SM clock MHz, power W) now, or None when nothing can say."""
        if self.nvml is not None:
            nv = self.nvml
            return float(nv.nvmlDeviceGetClockInfo(self.handle, nv.NVML_CLOCK_SM)), \
                nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0  # fmt: skip
        if self.source == "nvidia-smi":
            query = [
                "nvidia-smi",
                "-i",
                str(self.index),
                "--query-gpu=clocks.sm,power.draw",
                "--format=csv,noheader,nounits",
            ]
            out = subprocess.run(query, capture_output=True, text=True, timeout=10)
            try:
                clock, power = (float(v) for v in out.stdout.strip().split(","))
            except ValueError:
                return None
            return clock, power
        return None

    def power_limit_w(self) -> float | None:
        if self.nvml is None:
            return None
        return self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000.0

    def sampling(self) -> _Sampler:
        return _Sampler(self)


class _Sampler:
    """Samples every 50 ms in a thread while the ``with`` block runs; ``summary()`` after."""

    def __init__(self, clocks: Clocks) -> None:
        self.clocks, self.samples, self.stop = clocks, [], threading.Event()

    def __enter__(self) -> _Sampler:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            found = self.clocks.read()
            if found is not None:
                self.samples.append(found)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"sm_mhz": None}
        sm, power = [s[0] for s in self.samples], [s[1] for s in self.samples]
        return {"sm_mhz": statistics.median(sm), "sm_mhz_min": min(sm), "sm_mhz_max": max(sm),
                "power_w": statistics.median(power), "samples": len(sm)}  # fmt: skip


def warm_to_power_cap(clocks: Clocks, min_s: float, max_s: float) -> dict[str, Any]:
    """bf16 8192³ back to back until ``min_s`` have passed and the SM clock of the last second holds within 2 %
    (``max_s`` at most; ``min_s`` alone when nothing reads the clock)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start, history, first = time.perf_counter(), [], clocks.read()
    while True:
        for _ in range(20):
            torch.matmul(a, b)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        now = clocks.read()
        if now is not None:
            history.append((elapsed, now[0]))
        recent = [mhz for t, mhz in history if t >= elapsed - 1.0]
        settled = bool(recent) and max(recent) <= 1.02 * min(recent)
        if elapsed >= max_s or (elapsed >= min_s and (settled or now is None)):
            break
    last = clocks.read()
    return {"seconds": round(elapsed, 2), "settled": settled, "sm_mhz_before": first and first[0],
            "sm_mhz_after": last and last[0], "power_w_after": last and last[1],
            "power_limit_w": clocks.power_limit_w()}  # fmt: skip


# -- timing ------------------------------------------------------------------------------------------------------
def gpu_ms(fn: Callable[[], Any], per_call_ms: float) -> float:
    """ms per call from replays of a CUDA graph of calls (no host time in it), about TIMED_MS of GPU time in all:
    ``gemmbridge.bench.timing.gpu_us_per_op`` (the median of the event-timed replays)."""
    calls = max(1, min(50, round(5.0 / max(per_call_ms, 1e-3))))
    replays = max(1, round(TIMED_MS / (per_call_ms * calls)))
    return timing.gpu_us_per_op(fn, "torch", calls, replays) * 1e-3


def wall_ms(fn: Callable[[], Any], per_call_ms: float) -> float:
    """ms per call of calls launched back to back then one sync (host and GPU), about TIMED_MS of GPU time."""
    calls = max(3, round(TIMED_MS / max(per_call_ms, 1e-3)))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def estimate_ms(fn: Callable[[], Any]) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / 5


def prepare(name: str) -> None:
    """A fresh plan: the heuristic's first pick, autotuned in process, or from the tuning cache."""
    gb.set_autotune(name == "gemmbridge-autotuned")
    tuning.enabled = name == "gemmbridge-tuned"
    gb.clear_cache()


def use(plans: dict[tuple, Any]) -> None:
    """Make ``plans`` (a snapshot of gemmbridge's plan cache) the plans calls find: the same call, another choice."""
    gb.plan.PLANS.plans.clear()
    gb.plan.PLANS.plans.update(plans)


def bench_shape(label: str, m: int, n: int, k: int, budget_s: float, rounds: int, clocks: Clocks) -> dict:
    dtype = data.torch_dtype(data.DTYPES[label])
    tf32 = label == "tf32"
    tuning.enabled = True
    (tuned,) = gb.tune([f"{m}x{n}x{k}"], dtype=label, budget_s=budget_s)  # fills the cache for this shape
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(k, n, device="cuda", dtype=dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    ref = a.double() @ b.double()
    gemm = lambda: gb.matmul(a, b, allow_tf32=tf32, out=out)  # noqa: E731
    fns = {"gemmbridge": gemm, "gemmbridge-autotuned": gemm, "gemmbridge-tuned": gemm,
           "torch": lambda: torch.matmul(a, b, out=out)}  # fmt: skip
    name = f"{label} {m}x{n}x{k}"
    row: dict = {"name": name, "dtype": label, "m": m, "n": n, "k": k,
                 "tuning": {"first_ms": tuned.first_ms, "tuned_ms": tuned.tuned_ms, "noise": tuned.noise,
                            "chosen": tuned.chosen, "candidates": tuned.candidates}}  # fmt: skip
    per_call, plans = {}, {}
    for cand, fn in fns.items():
        prepare(cand)
        out.fill_(float("nan"))
        fn()  # the plan made (and tuned, for the autotuned one) once, outside any capture
        plans[cand] = dict(gb.plan.PLANS.plans)
        err = data.rel_err(out, ref, "cuda")
        row[f"{cand}_rel_err"] = err
        if not err < data.DTYPES[label].tolerance:
            raise SystemExit(f"{cand} is wrong for {name}: rel err {err:.2e}")
        if cand == "gemmbridge-tuned":
            (plan,) = gb.plan.PLANS.plans.values()
            ((lt, _, _),) = plan.state.plans.values()
            row["tuned_plan_from_cache"] = lt.choice == -1  # restored from the cache, not the heuristic's list
        per_call[cand] = estimate_ms(fn)
    del ref
    gb.set_autotune(False)  # the plans are made: nothing below tunes or reads the cache
    tuning.enabled = False
    gpu: dict[str, list[float]] = {c: [] for c in fns}
    wall: dict[str, list[float]] = {c: [] for c in fns}
    orders = []
    with clocks.sampling() as sampler:
        for r in range(rounds):
            order = rotated(list(fns), r)
            orders.append(order)
            for cand in order:
                use(plans[cand])  # each gemmbridge candidate's own plan, as made above
                gpu[cand].append(gpu_ms(fns[cand], per_call[cand]))
                wall[cand].append(wall_ms(fns[cand], per_call[cand]))
    row["clock"] = sampler.summary()
    row["orders"] = orders
    judge(row, gpu, wall)
    torch.backends.cuda.matmul.allow_tf32 = False
    gb.clear_cache()
    return row


def host_us_per_call(fn: Callable[[], Any], calls: int = 5000, repeats: int = 7) -> list[float]:
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
    fns = {"gemmbridge": lambda: gb.matmul(a, b, allow_tf32=False), "torch": lambda: torch.matmul(a, b)}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(2):
        for name in rotated(list(fns), r):
            samples[name] += host_us_per_call(fns[name])
    row: dict[str, Any] = {"shape": [n, n, n], "dtype": "fp32"}
    for name, values in samples.items():
        row[f"{name}_us"] = statistics.median(values)
        row[f"{name}_us_samples"] = values
    row["ratio"] = row["gemmbridge_us"] / row["torch_us"]
    return row


def versions() -> dict:
    import nvmath

    from gemmbridge.info import cuda_versions

    return {"gemmbridge": gb.__version__, "torch": torch.__version__, "nvmath-python": nvmath.__version__,
            "python": platform.python_version(), **cuda_versions()}  # fmt: skip


def driver_version(clocks: Clocks) -> str | None:
    if clocks.nvml is not None:
        found = clocks.nvml.nvmlSystemGetDriverVersion()
        return found.decode() if isinstance(found, bytes) else str(found)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of exploring per shape (gemmbridge.tune)")
    parser.add_argument("--dtypes", default=",".join(LABELS), help="comma list of " + ", ".join(LABELS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, the order rotated each round")
    parser.add_argument("--warm-s", type=float, default=3.0, help="at least this long warming to the power cap")
    args = parser.parse_args()
    labels = [t for t in args.dtypes.split(",") if t]
    if set(labels) - set(LABELS):
        raise SystemExit(f"--dtypes: choose from {', '.join(LABELS)}")
    if not args.rounds >= 3:
        raise SystemExit("--rounds: at least 3")
    if not os.environ.get("GEMMBRIDGE_CACHE_DIR"):
        os.environ["GEMMBRIDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemmbridge-bench-tuning-")
    torch.manual_seed(0)
    clocks = Clocks(torch.cuda.current_device())
    warm = warm_to_power_cap(clocks, args.warm_s, max(args.warm_s, 15.0))
    print(f"warm-up: {warm['seconds']} s, SM {warm['sm_mhz_before']} -> {warm['sm_mhz_after']} MHz, "
          f"{warm['power_w_after']} W of {warm['power_limit_w']} W ({clocks.source})", flush=True)  # fmt: skip
    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**versions(), "nvidia_driver": driver_version(clocks)},
        "method": f"warmed to the power cap first; per row {args.rounds} rounds, each timing every candidate once "
        "in an order rotated by one each round; GPU time: replays of a CUDA graph of the calls (each event-timed, "
        "median, ~50 ms in all), wall time: the calls back to back then one sync (~50 ms of GPU work); medians of the "
        "rounds; "
        f"host-bound: wall > {HOST_BOUND} x GPU; ratios to torch on GPU time; gemmbridge-tuned: gemmbridge.tune "
        "(exploring, budget below) then a fresh plan from the tuning cache; gemmbridge-autotuned: "
        "set_autotune(True), a fresh plan tuned in process; host: 5000 eager calls without sync then one sync, "
        "7 repeats x 2 rounds, median",
        "candidates": list(CANDIDATES),
        "tune_budget_s": args.budget,
        "tuning_cache": os.environ["GEMMBRIDGE_CACHE_DIR"],
        "clock_source": clocks.source,
        "warmup": warm,
        "gemm": [],
    }
    for label in labels:
        for m, n, k in SHAPES:
            if label == "fp32" and m * n * k > 4096**3:
                continue
            row = bench_shape(label, m, n, k, args.budget, args.rounds, clocks)
            result["gemm"].append(row)
            bound = [c for c, v in row["host_bound"].items() if v]
            print(
                f"{row['name']:24} GPU TFLOP/s: gemmbridge {row['gemmbridge_tflops']:6.1f}  tuned "
                f"{row['gemmbridge-tuned_tflops']:6.1f}  autotuned {row['gemmbridge-autotuned_tflops']:6.1f}  torch "
                f"{row['torch_tflops']:6.1f} | ratio {row['ratio']:.3f} tuned {row['ratio_tuned']:.3f} autotuned "
                f"{row['ratio_autotuned']:.3f} | wall ratio {row['ratio_wall']:.3f} | SM {row['clock']['sm_mhz']} MHz"
                f"{' | host-bound: ' + ', '.join(bound) if bound else ''} | {row['tuning']['chosen']}",
                flush=True,
            )
    result["host"] = bench_host()
    h = result["host"]
    print(f"host fp32 64^3: gemmbridge {h['gemmbridge_us']:.2f} us/call, torch {h['torch_us']:.2f} us/call, "
          f"ratio {h['ratio']:.3f}")  # fmt: skip
    result.update(summarize(result["gemm"]))
    for key in RATIOS:
        print(f"{key}: geo-mean {result[f'geomean_{key}']}, min {result[f'min_{key}']} (GPU time, rows not host-bound)")
    print(f"host-bound rows: {result['host_bound_rows']}; tuned slower than untuned beyond the noise: "
          f"{result['tuned_slower_rows']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
