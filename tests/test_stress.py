"""``gemmbridge stress`` on the CPU: it passes as is, each failure path (wrong result, a failing call that
does not raise or that writes into out, memory growth, an overfull plan cache) makes it fail, bad options are
refused, and host RSS is judged only once the per-shape caches have met the whole problem set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemmbridge
from gemmbridge import stress
from gemmbridge.errors import OptionError
from gemmbridge.ops import PLAN_CACHE_SIZE
from gemmbridge.stress import check, memory, options, report, runner
from gemmbridge.stress.draw import Call, Drawer
from gemmbridge.testing import Framework

SMALL = {"iterations": 120, "max_dim": 40, "seed": 1234, "problems": 30, "progress": False, "device": "cpu"}


def run(**kwargs) -> dict:
    lines: list[str] = []
    result = stress.run(stress.StressOptions(**{**SMALL, **kwargs}, log=lines.append))
    result["log"] = lines
    return result


def frameworks() -> str:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "numpy"
    return "numpy,torch"


def test_passes_with_numpy_and_torch(tmp_path: Path):
    path = tmp_path / "stress.json"
    result = run(frameworks=frameworks(), json_path=str(path))
    assert result["ok"], result["log"]
    largest = 4 * len(frameworks().split(","))  # one call of the largest size per framework and dtype
    # the pass over the set (30 valid, 30 failing), then 120 counted calls, every fifth one failing
    assert result["counts"] == {"largest": largest, "valid": 30 + 96, "checked": result["counts"]["checked"],
                                "failing": 30 + 24}  # fmt: skip
    assert result["counts"]["checked"] >= 40  # the valid ones of the first 50, then every 10th
    assert result["growth_after_warmup"].keys() == {"host_rss"}  # CPU: no device memory to track
    assert result["plan_cache_max"] <= PLAN_CACHE_SIZE
    assert "seed 1234" in result["log"][0] and result["log"][-1] == "stress PASS (seed 1234)"
    log = json.loads(path.read_text())
    assert log["ok"] and log["seed"] == 1234 and log["set_pass_calls"] == 60 and log["samples"][0]["iteration"] == 72
    assert log["samples"][-1]["iteration"] == 180 and log["tolerances"]["plan_cache"] == PLAN_CACHE_SIZE


def test_the_seed_replays_the_same_calls():
    fws = [Framework("numpy", "cpu")]
    texts = [[Drawer(7, fws, 50).valid(False).text for _ in range(20)] for _ in range(2)]
    assert texts[0] == texts[1]
    assert texts[0] != [Drawer(8, fws, 50).valid(False).text for _ in range(20)]


def test_a_bounded_problem_set_repeats_problems_with_fresh_data():
    fws = [Framework("numpy", "cpu")]
    drawer = Drawer(7, fws, 50, problems=3)
    calls = [drawer.valid(False) for _ in range(40)] + [drawer.failing() for _ in range(40)]

    def layout(call: Call) -> tuple:  # views and out= differ in strides, not in text
        arrays = [*call.args, *(v for v in call.kwargs.values() if hasattr(v, "strides"))]
        return call.text, tuple(x.strides for x in arrays)

    assert len({layout(call) for call in calls[:40]}) <= 3
    valid_texts = {call.text for call in calls[:40]}
    failing_texts = {call.text for call in calls[40:]}
    assert len(valid_texts) <= 3 and len(failing_texts) <= 3 and len(valid_texts | failing_texts) >= 4
    same = [call for call in calls[:40] if call.text == calls[0].text]
    assert len(same) >= 2 and not np.array_equal(same[0].args[0], same[1].args[0])  # fresh data each time
    unbounded = Drawer(7, fws, 50)
    assert len({unbounded.valid(False).text for _ in range(40)}) > 3


def test_one_pass_makes_every_problem_of_the_set_once():
    fws = [Framework("numpy", "cpu")]
    drawer = Drawer(7, fws, 50, problems=4)
    passed = [drawer.nth(i, False).text for i in range(8)]
    assert len(set(passed[:4])) == 4 and all("failing" in text for text in passed[4:]) and len(set(passed[4:])) == 4
    assert {drawer.valid(False).text for _ in range(60)} == set(passed[:4])
    assert {drawer.failing().text for _ in range(60)} == set(passed[4:])


def test_a_bounded_run_records_its_problem_count():
    result = run(frameworks="numpy", problems=4)
    assert result["ok"] and result["problems"] == 4
    assert "a set of 4 problems" in result["log"][0] and "replay: --seed 1234 --problems 4" in result["log"][0]
    assert "a new problem each call" in run(frameworks="numpy", problems=0)["log"][0]
    assert "replay: --seed 1234)" in run(frameworks="numpy", problems=2000, iterations=5)["log"][0]  # the default


def _wrapped(monkeypatch, wrapper) -> None:
    real = check.matmul
    monkeypatch.setattr(check, "matmul", lambda *args, **kwargs: wrapper(real, *args, **kwargs))


def test_a_wrong_result_fails(monkeypatch):
    def planted(real, *args, **kwargs):
        result = real(*args, **kwargs)
        if isinstance(result, np.ndarray) and result.size and "out" not in kwargs:
            result[...] = result * 1.5 + 1.0  # wrong, but the right type, dtype and shape
        return result

    _wrapped(monkeypatch, planted)
    result = run(frameworks="numpy")
    assert not result["ok"] and result["failure_count"] > 0
    assert any("relative error" in f["problem"] for f in result["failures"])
    assert result["log"][-1].startswith("stress FAIL")


def test_a_failing_call_that_does_not_raise_fails(monkeypatch):
    def swallow(real, *args, **kwargs):
        try:
            return real(*args, **kwargs)
        except gemmbridge.GemmError:
            return None

    _wrapped(monkeypatch, swallow)
    result = run(frameworks="numpy")
    assert not result["ok"] and result["counts"]["failing"] == result["failure_count"] == 30 + 24
    assert all("did not raise" in f["problem"] for f in result["failures"])


def test_a_failed_call_that_writes_into_out_fails(monkeypatch):
    def scribble(real, *args, **kwargs):
        try:
            return real(*args, **kwargs)
        except gemmbridge.GemmError:
            if kwargs.get("out") is not None:
                kwargs["out"][...] = 0
            raise

    _wrapped(monkeypatch, scribble)
    result = run(frameworks="numpy")
    assert not result["ok"]
    assert any(f["problem"] == "a failed call wrote into out" for f in result["failures"])


def test_host_memory_growth_over_the_tolerance_fails(monkeypatch):
    rss = iter(range(100 << 20, 1 << 40, 4 << 20))  # 4 MiB more at every sample: a leak
    monkeypatch.setattr(memory, "host_rss", lambda: next(rss))
    result = run(frameworks="numpy", rss_tolerance_mb=8)
    assert not result["ok"] and result["failure_count"] == 0
    assert set(result["over_tolerance"]) == {"host_rss"}
    assert any("host_rss" in line and "OVER" in line for line in result["log"])


def test_a_plan_cache_over_its_bound_fails(monkeypatch):
    monkeypatch.setattr(runner, "cache_size", lambda: PLAN_CACHE_SIZE + 1)
    result = run(frameworks="numpy", iterations=20)
    assert not result["ok"] and result["plan_cache_max"] == PLAN_CACHE_SIZE + 1


def test_tolerances_are_stated_and_cuda_primes_first(monkeypatch):
    monkeypatch.setattr(options, "resolve_device", lambda name: name)  # plans for cuda on a machine without one
    stated = stress.StressOptions(rss_tolerance_mb=8, device_tolerance_mb=64, frameworks="torch")
    cpu = options.resolve(stress.StressOptions(**{**vars(stated), "device": "cpu"}))
    assert memory.tolerances(stated, cpu) == {"host_rss": 8 << 20}  # CPU: no device memory to judge
    cuda = options.resolve(stress.StressOptions(**{**vars(stated), "device": "cuda"}))
    assert memory.tolerances(stated, cuda) == {"host_rss": 8 << 20, "torch_allocated": 0, "device_used": 64 << 20}
    both = options.resolve(stress.StressOptions(**{**vars(stated), "device": "cuda", "frameworks": "torch,cupy"}))
    assert memory.tolerances(stated, both).keys() == {"host_rss", "torch_allocated", "cupy_used", "device_used"}
    assert cuda.prime_calls == options.PRIME_CALLS_CUDA and cpu.prime_calls == 0
    short = options.resolve(stress.StressOptions(short=True, device="cuda", frameworks="torch"))
    assert short.prime_calls == 0 and not short.set_pass
    assert memory.tolerances(stated, short)["host_rss"] is None  # a short run reports RSS, does not judge it


def test_host_rss_is_judged_only_after_a_pass_over_a_bounded_set():
    judged = run(frameworks="numpy", iterations=20)
    assert judged["tolerances"]["host_rss"] == 8 << 20 and judged["host_rss_not_judged"] is None
    assert "host RSS growth ≤ 8 MiB" in judged["log"][1]
    unbounded, short = run(frameworks="numpy", iterations=20, problems=0), run(frameworks="numpy", short=True)
    for result, why in ((unbounded, "a new problem every call"), (short, "a short run")):
        assert result["tolerances"]["host_rss"] is None and result["set_pass_calls"] == 0
        assert result["host_rss_not_judged"].startswith(why)
        assert "host RSS is reported, not judged: " + result["host_rss_not_judged"] in result["log"]
    rss = iter(range(100 << 20, 1 << 40, 4 << 20))  # growth that would fail a judged run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "host_rss", lambda: next(rss))
        assert run(frameworks="numpy", problems=0)["ok"]


def test_jax_compiles_nothing_new_after_the_pass_over_the_set(monkeypatch):
    """JAX compiles an executable per new shape: after the pass, its caches hold every shape the run meets,
    so the host RSS measured from the warm-up sample on is not JAX meeting new shapes."""
    jax = pytest.importorskip("jax")
    compiles: list[int] = []

    def count(event: str, *args: object, **kwargs: object) -> None:
        compiles.append(event == "/jax/core/compile/backend_compile_duration")

    real = memory.sample
    at_samples: list[int] = []

    def sample(*args, **kwargs):
        at_samples.append(sum(compiles))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "sample", sample)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        result = run(frameworks="jax", problems=12, iterations=200, max_dim=24)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert result["ok"], result["log"]
    assert sum(compiles) > 0 and len(at_samples) >= 3 and at_samples[0] == at_samples[-1]


@pytest.mark.parametrize(
    ("given", "flag"),
    [({"iterations": 0}, "--iterations 0"), ({"iterations": -5}, "--iterations -5"),
     ({"check_every": 0}, "--check-every 0"), ({"max_dim": 0}, "--max-dim 0"), ({"prime_calls": -1}, "--prime-calls"),
     ({"problems": -1}, "--problems -1"), ({"rss_tolerance_mb": -1.0}, "--rss-tolerance-mb")],
)  # fmt: skip
def test_values_that_cannot_run_are_refused_not_replaced(given, flag):
    with pytest.raises(OptionError, match=flag):
        run(frameworks="numpy", **given)


def test_the_header_says_what_is_judged_in_words():
    every = run(frameworks="numpy", iterations=20, check_every=1)["log"]
    assert "then every call" in every[2] and "1th" not in every[2]
    assert "then every 2nd call" in run(frameworks="numpy", iterations=20, check_every=2)["log"][2]
    assert [report.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "111th",
    ]  # fmt: skip
    assert not any("cudaMemGetInfo" in line or "allocator" in line for line in every)  # a CPU run judges neither


def test_check_tolerates_cancellation_but_not_a_missing_bias():
    fw = Framework("numpy", "cpu")
    a = np.array([[1.0, 1.0]], dtype=np.float32)
    b = np.array([[1e4], [-1e4 + 1e-3]], dtype=np.float32)  # a @ b cancels to about 1e-3
    call = Call("cancel", fw, (a, b), {}, "float32", None, {"a": a.astype(float), "b": b.astype(float)}, 2)
    assert check.check_result(call, gemmbridge.matmul(a, b)) is None
    rng = np.random.default_rng(0)
    a, b, bias = (rng.standard_normal(s).astype(np.float32) for s in ((30, 20), (20, 10), (10,)))
    inputs = {"a": a.astype(float), "b": b.astype(float), "bias": bias.astype(float)}
    call = Call("bias", fw, (a, b), {"bias": bias}, "float32", None, inputs, 20)
    assert check.check_result(call, gemmbridge.matmul(a, b, bias=bias)) is None
    assert "relative error" in check.check_result(call, gemmbridge.matmul(a, b))


def test_cli_exit_status_and_help(tmp_path: Path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gemmbridge.cli", "stress", *args], capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    path = tmp_path / "log.json"
    ok = cli("--iterations", "60", "--max-dim", "32", "--seed", "5", "--device", "cpu", "--json", str(path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "seed 5" in ok.stdout and "stress PASS" in ok.stdout and json.loads(path.read_text())["ok"]
    bad = cli("--frameworks", "cupy", "--device", "cpu")
    assert bad.returncode == 2 and "cupy arrays live on the GPU" in bad.stderr
    help_text = cli("--help").stdout
    assert "compute-sanitizer --tool memcheck" in help_text and "--short" in help_text


@pytest.mark.gpu
def test_short_run_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # cudaMemGetInfo counts the whole GPU: beside other test processes (pytest -n) their allocations show up as this
    # run's growth, so the device figure is judged only when this process runs alone (``STEPS=stress`` judges it)
    shared = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
    result = run(device="cuda", short=True, iterations=300, **({"device_tolerance_mb": 1e6} if shared else {}))
    assert result["ok"], "\n".join(result["log"])
    assert result["growth_after_warmup"]["torch_allocated"] == 0


def test_a_negative_seed_is_refused_in_one_line():
    with pytest.raises(OptionError, match="--seed -1: at least 0"):
        options.resolve(options.StressOptions(seed=-1, device="cpu"))
    found = subprocess.run([sys.executable, "-m", "gemmbridge.cli", "stress", "--seed", "-1", "--device", "cpu"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert found.returncode == 2 and found.stderr == "gemmbridge stress: --seed -1: at least 0\n", found.stderr
