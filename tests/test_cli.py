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
