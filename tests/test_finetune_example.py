"""The LoRA fine-tune example, at its CPU size (chosen by itself without a GPU): every run trains and is timed in
rounds, and the bridge's loss curves are PEFT's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "finetune_lora.py"


def test_the_example_runs_small_and_the_bridge_matches_peft(tmp_path):
    torch = pytest.importorskip("torch")
    out, png = tmp_path / "figures.json", tmp_path / "plot.png"
    small = [] if not torch.cuda.is_available() else ["--small"]  # without a GPU: small, on its own
    args = [sys.executable, str(EXAMPLE), *small, "--steps", "12", "--rounds", "1", "--json", str(out), "--plot",
            str(png)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if not small:
        assert done.stdout.startswith("no CUDA GPU: the small configuration on the CPU (--small)\n")
    assert "gemmbridge bridge: 14 LoRA layers on gemmbridge, 0 left to PEFT" in done.stdout
    header = next(line for line in done.stdout.splitlines() if line.startswith("run "))
    assert header.split()[-5:] == ["step", "ms", "spread", "×", "floor"]  # on the CPU, no peak memory column
    doc = json.loads(out.read_text())
    assert set(doc["runs"]) == {"frozen (floor)", "peft defaults", "peft bf16 adapters", "gemmbridge bridge",
                                "gemmbridge bridge, bf16 adapters"}  # fmt: skip
    for run in doc["runs"].values():
        assert len(run["losses"]) == 12 and run["step_ms"] == min(run["step_ms_runs"]) > 0
        assert 2 <= len(run["step_ms_runs"]) <= 6 and run["stable"] == (run["spread"] <= 0.05)
    assert max(doc["loss_gaps"].values()) < 1e-4  # float32 on the CPU: the same numbers up to rounding
    assert "peft bf16 adapters vs peft defaults (in float32 the same run: 0 expected)" in doc["loss_gaps"]
    lora = doc["runs"]["gemmbridge bridge"]["losses"]
    assert lora != doc["runs"]["frozen (floor)"]["losses"]  # the adapters trained
    assert png.stat().st_size > 10_000


def test_a_plot_without_matplotlib_is_refused_before_any_work():
    code = "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; " \
        "runpy.run_path(sys.argv[0], run_name='__main__')"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "" and "error: --plot needs matplotlib" in done.stderr
