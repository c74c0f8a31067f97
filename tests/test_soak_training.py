"""scripts/soak_training.py on the CPU, in a few steps: both runs train, every figure is sampled and judged.

The 10,000-step run is the device's (``STEPS=soak bash scripts/device_run.sh``)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

SCRIPT = Path(__file__).parent.parent / "scripts" / "soak_training.py"


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("soak_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_a_short_soak_on_the_cpu_writes_both_runs_judged(tmp_path):
    out = tmp_path / "soak.json"
    options = "--device cpu --steps 16 --every 2 --shapes 2 --warmup 8 --sample-every 4"
    done = subprocess.run([sys.executable, str(SCRIPT), *options.split(), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and [r["run"] for r in report["runs"]] == ["apply_lora", "bridge"]
    for run in report["runs"]:
        assert [s["step"] for s in run["samples"]] == [0, 4, 8, 12, 15]
        assert run["judged_from_step"] == 8 and math.isfinite(run["loss_last"])
        assert {"host_rss", "plan_cache", "plans"} <= run["growth"].keys()
        assert all(s["lane_layouts"] > 0 for s in run["samples"])  # the lane's resolved GEMMs are seen


def test_growth_after_the_warm_up_past_a_tolerance_fails_the_run():
    judge = load_script().judge
    rss = [100, 130, 110, 120, 150]  # grows during the warm-up (steps 0, 10), churns below its peak, then grows
    samples = [{"step": 10 * i, "host_rss": rss[i], "plans": 5 + (i >= 3)} for i in range(5)]
    growth, exceeded = judge(samples, 10, {"host_rss": 30, "plans": 0})
    assert growth == {"host_rss": 20, "plans": 1} and exceeded == {"plans": 1}
    assert judge(samples[:4], 10, {"host_rss": 0, "plans": 1}) == ({"host_rss": -10, "plans": 1}, {})
    assert judge(samples, 40, {"host_rss": 0}) == ({}, {})


def test_the_graph_bound_counts_every_plan_of_a_plan_state(monkeypatch):
    """A plan state keeps one plan (and graph cache, ``GRAPHS_PER_PLAN`` graphs at most) per pointer alignment and TF32
    setting: one state with two full caches is within the bound (it was taken as ``GRAPHS_PER_PLAN`` a state)."""
    import torch

    pytest.importorskip("cuda.bindings.driver")
    from gemmbridge.backends.cuda import PlanState, graphs

    script = load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(graphs, "_doomed", [])  # the caches' dummy executables go there when they are dropped
    before = script.gemmbridge_objects()
    caches = [graphs.GraphCache(), graphs.GraphCache()]
    for cache in caches:
        cache.execs.update({(i,): (None, i) for i in range(graphs.GRAPHS_PER_PLAN)})
    state = PlanState.__new__(PlanState)
    state.plans = {(key,): (None, cache, None) for key, cache in enumerate(caches)}
    after = script.gemmbridge_objects()
    assert after["graphs"] - before["graphs"] == 2 * graphs.GRAPHS_PER_PLAN
    assert after["plan_states"] - before["plan_states"] == 1
    assert script.graph_bound(after) - script.graph_bound(before) == 2 * graphs.GRAPHS_PER_PLAN
