"""The ``gemmbridge`` command: ``info`` on the machine at hand (the CPU backend always; CUDA when present), the
help texts, ``python -m gemmbridge``, and what is refused before any work starts (with one line, exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import gemmbridge
from gemmbridge import cli, info


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
    assert {c["name"] for c in report["caches"]} >= {"gemmbridge plans", "gemmbridge tuning", "triton kernels",
                                                     "cupy kernels", "gemmbridge kernels (cubins)"}  # fmt: skip
    cubins = next(c for c in report["caches"] if c["name"] == "gemmbridge kernels (cubins)")
    assert cubins["location"] == os.path.join(os.environ["GEMMBRIDGE_CACHE_DIR"], "kernels")
    tuned = next(c for c in report["caches"] if c["name"] == "gemmbridge tuning")
    assert tuned["location"] == os.environ["GEMMBRIDGE_CACHE_DIR"]  # the tests' private one (conftest)


def test_bench_and_stress_have_help():
    bench = run_cli("bench", "--help")
    assert bench.returncode == 0 and "--shape" in bench.stdout and "--plot" in bench.stdout
    stress = run_cli("stress", "--help")
    assert stress.returncode == 0 and "--iterations" in stress.stdout and "compute-sanitizer" in stress.stdout


def test_bad_options_exit_2_with_a_message():
    result = run_cli("bench", "--device", "cpu", "--shape", "12x")
    assert result.returncode == 2 and "is not MxNxK" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("bench", "--device", "cpu", "--dtype", "int8")
    assert result.returncode == 2 and result.stderr.startswith("gemmbridge bench: --dtype 'int8'")  # said once
    result = run_cli("stress", "--device", "cpu", "--problems", "-1")
    assert result.returncode == 2 and result.stderr.startswith("gemmbridge stress: --problems -1")
    assert "Traceback" not in result.stderr


def test_top_level_help_and_python_m():
    for flag in ("--help", "-h"):
        result = subprocess.run([sys.executable, "-m", "gemmbridge", flag], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: gemmbridge") and "% of roofline" in result.stdout
        assert all(command in result.stdout for command in ("info", "bench", "stress"))


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("command", ["bench", "stress"])
def test_cuda_without_a_gpu_is_one_line_for_bench_and_stress(monkeypatch, capsys, command):
    monkeypatch.setattr(info, "_torch_cuda_missing", lambda: "torch 2.13.0+cpu is a CPU-only build")
    status, out, err = _main(capsys, command, "--device", "cuda", "--no-progress")
    assert status == 2 and out == ""
    assert err == f"gemmbridge {command}: --device cuda needs torch with a visible CUDA device: torch 2.13.0+cpu " \
        "is a CPU-only build\n"  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [("stress", "--iterations", "0"), ("stress", "--iterations", "-5"), ("stress", "--check-every", "0"),
     ("stress", "--max-dim", "0"), ("stress", "--prime-calls", "-1"), ("bench", "--rounds", "0"),
     ("bench", "--rounds", "-2"), ("bench", "--rep-ms", "0"), ("bench", "--rep-ms", "-1"),
     ("bench", "--peak-size", "0"), ("bench", "--peak-size", "-64")],
)  # fmt: skip
def test_values_that_cannot_run_are_refused_not_replaced(capsys, args):
    command, flag, value = args
    status, out, err = _main(capsys, command, "--device", "cpu", flag, value, "--no-progress")
    assert status == 2 and out == "" and err.startswith(f"gemmbridge {command}: {flag} {value}: ")


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the run started")


def test_outputs_are_checked_before_the_run(monkeypatch, capsys, tmp_path):
    from gemmbridge import stress
    from gemmbridge.bench import runner

    monkeypatch.setattr(runner, "run", _never)
    monkeypatch.setattr(stress, "run", _never)
    missing = str(tmp_path / "no" / "such" / "x.json")
    for command in ("bench", "stress"):
        status, _, err = _main(capsys, command, "--device", "cpu", "--json", missing)
        assert status == 2 and f"--json {missing}: the directory" in err and "does not exist" in err
    status, _, err = _main(capsys, "bench", "--device", "cpu", "--plot", str(tmp_path))
    assert status == 2 and "is a directory" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    status, _, err = _main(capsys, "bench", "--device", "cpu", "--plot", str(tmp_path / "b.png"))
    assert status == 2 and err == "gemmbridge bench: --plot needs matplotlib: pip install matplotlib (or the [bench] " \
        "extra)\n"  # fmt: skip


def test_stress_repeats_the_problem_set_it_is_given(tmp_path):
    path = tmp_path / "stress.json"
    result = run_cli("stress", "--device", "cpu", "--frameworks", "numpy", "--iterations", "60", "--problems", "5",
                     "--max-dim", "20", "--no-progress", "--json", str(path))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a set of 5 problems" in result.stdout and json.loads(path.read_text())["problems"] == 5


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"gemmbridge {gemmbridge.__version__}\n"


def test_info_json_takes_a_path_as_bench_stress_and_tune_do(tmp_path):
    path = tmp_path / "info.json"
    result = run_cli("info", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gemmbridge ") and result.stdout.rstrip().endswith(f"wrote {path}")
    assert json.loads(path.read_text())["versions"]["gemmbridge"] == gemmbridge.__version__
    printed = run_cli("info", "--json", "-")
    assert json.loads(printed.stdout)["versions"]["gemmbridge"] == gemmbridge.__version__


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--shapes", "64x64x64", "--tokens", "10"), "--tokens 10 goes with --model; with --shapes, each shape's M is "
      "its rows"),
     (("--shapes", "0x0x0"), "--shapes '0x0x0' has a zero dimension"),
     (("--shapes", "64x64"), "--shapes '64x64' is not MxNxK"),
     (("--model", "m:f", "--tokens", "0"), "--tokens 0: a positive number of rows"),
     (("--model", "m:f", "--tokens", "8", "--transpose-b"), "--transpose-a / --transpose-b go with --shapes")],
)  # fmt: skip
def test_tune_names_the_option_at_fault(capsys, args, message):
    status, out, err = _main(capsys, "tune", *args)
    assert status == 2 and out == "" and err.startswith(f"gemmbridge tune: {message}")


def test_bench_refuses_a_selection_that_cannot_run_here(monkeypatch, capsys):
    from gemmbridge.bench import runner

    monkeypatch.setattr(runner, "copy_bandwidth", _never)
    status, out, err = _main(capsys, "bench", "--device", "cpu", "--candidates", "cupy,nvmath", "--no-progress")
    assert status == 2 and out == ""
    assert err == "gemmbridge bench: --candidates cupy,nvmath: none can run on cpu (cupy: runs on CUDA only; this " \
        "run is on the CPU; nvmath: runs on CUDA only; this run is on the CPU)\n"  # fmt: skip
