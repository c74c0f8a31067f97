"""``benchmarks/matmul_vs_torch.py``'s bookkeeping, on the CPU: the rotated order of its rounds, the host-bound and
tuned-slower verdicts, and the geo-means over the rows that are not host-bound. (Its timing runs on the GPU:
``STEPS=bench bash scripts/device_run.sh``.)"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("nvmath.bindings.cublasLt")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "matmul_vs_torch.py"
spec = importlib.util.spec_from_file_location("matmul_vs_torch", SCRIPT)
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_each_round_starts_with_another_candidate_and_times_each_once():
    names = list(bench.CANDIDATES)
    orders = [bench.rotated(names, r) for r in range(5)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert [o[0] for o in orders] == [names[0], names[1], names[2], names[3], names[0]]


def row(name: str, gpu: dict[str, list[float]], wall: dict[str, list[float]]) -> dict:
    return bench.judge({"name": name, "m": 1024, "n": 1024, "k": 1024}, gpu, wall)


def test_rows_are_judged_on_gpu_time_and_host_bound_rows_are_named_and_left_out():
    steady = {c: [1.0, 1.0, 1.0] for c in bench.CANDIDATES}
    fast = {**steady, "gemmbridge-tuned": [0.8, 0.8, 0.8], "torch": [0.9, 0.9, 0.9]}
    host = {**steady, "gemmbridge": [2.0, 2.0, 2.0]}  # its wall time: twice its GPU time
    rows = [row("compute-bound", fast, fast), row("host-bound", steady, host)]
    assert rows[0]["ratio_tuned"] == pytest.approx(0.9 / 0.8) and rows[0]["ratio"] == pytest.approx(0.9)
    assert not any(rows[0]["host_bound"].values()) and rows[1]["host_bound"]["gemmbridge"]
    assert rows[1]["ratio_wall"] == pytest.approx(0.5) and rows[1]["ratio"] == 1.0  # GPU time: a tie
    summary = bench.summarize(rows)
    assert summary["host_bound_rows"] == ["host-bound"] and summary["geomean_ratio_tuned"] == pytest.approx(1.125)
    assert summary["tuned_slower_rows"] == []


def test_a_tuned_choice_slower_than_the_first_pick_beyond_the_noise_is_named():
    base = {c: [1.0, 1.0, 1.0] for c in bench.CANDIDATES}
    slower = row("slower", {**base, "gemmbridge-tuned": [1.08, 1.09, 1.08]}, base)
    noisy = row("noisy", {**base, "gemmbridge-tuned": [0.95, 1.05, 1.08]}, base)  # 3 % slower, 13 % spread
    assert slower["tuned_slower"] and not noisy["tuned_slower"]
    assert bench.summarize([slower, noisy])["tuned_slower_rows"] == ["slower"]
    assert noisy["gemmbridge-tuned_gpu_ms"] == statistics.median([0.95, 1.05, 1.08])
