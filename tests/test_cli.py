"""``gemmbridge info`` on the machine at hand (the CPU backend always; CUDA when present)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmbridge.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_runs_a_passing_self_check_per_backend():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert "gemmbridge 0.1.0" in result.stdout
    cpu_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("cpu"))
    assert "self-check" in cpu_line and cpu_line.rstrip().endswith("ok")


def test_info_json_reports_versions_and_checks():
    result = run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["versions"]["numpy"]
    cpu = next(c for c in report["checks"] if c["backend"] == "cpu")
    assert cpu["ok"] is True and 0 < cpu["rel_err"] < 1e-5


def test_info_reports_cuda_versions_and_cache_locations():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("cuda: ") for line in lines)
    caches = lines[lines.index("caches:") + 1 :]
    assert any("gemmbridge plans" in line and "512" in line for line in caches)
    assert any(line.split()[0] == "triton" and ".triton" in line or "TRITON" in line for line in caches)
    report = json.loads(run_cli("info", "--json").stdout)
    assert {"cuda_driver", "cuda_runtime", "cublasLt"} <= set(report["cuda"])
    assert {c["name"] for c in report["caches"]} >= {"gemmbridge plans", "triton kernels", "cupy kernels"}


def test_bench_and_stress_have_help():
    bench = run_cli("bench", "--help")
    assert bench.returncode == 0 and "--shape" in bench.stdout and "--plot" in bench.stdout
    stress = run_cli("stress", "--help")
    assert stress.returncode == 0 and "--iterations" in stress.stdout and "compute-sanitizer" in stress.stdout


def test_bad_options_exit_2_with_a_message():
    result = run_cli("bench", "--device", "cpu", "--shape", "12x")
    assert result.returncode == 2 and "is not MxNxK" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("bench", "--device", "cpu", "--dtype", "int8")
    assert result.returncode == 2 and "--dtype" in result.stderr
    result = run_cli("stress", "--device", "cpu", "--problems", "-1")
    assert result.returncode == 2 and "--problems -1" in result.stderr and "Traceback" not in result.stderr


def test_stress_repeats_the_problem_set_it_is_given(tmp_path):
    path = tmp_path / "stress.json"
    result = run_cli("stress", "--device", "cpu", "--frameworks", "numpy", "--iterations", "60", "--problems", "5",
                     "--max-dim", "20", "--no-progress", "--json", str(path))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a set of 5 problems" in result.stdout and json.loads(path.read_text())["problems"] == 5


def test_bench_on_cuda_without_a_gpu_says_why():
    try:
        import torch

        if torch.cuda.is_available():
            return
    except ImportError:
        pass
    result = run_cli("bench", "--device", "cuda")
    assert result.returncode == 2 and "needs torch with a visible CUDA device" in result.stderr
