"""The LoRA fine-tune example, at its CPU size: every run trains, and the bridge's loss curves are PEFT's."""

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
    out, png = tmp_path / "figures.json", tmp_path / "plot.png"
    args = [sys.executable, str(EXAMPLE), "--small", "--steps", "12", "--json", str(out), "--plot", str(png)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gemmbridge bridge: 14 LoRA layers on gemmbridge, 0 left to PEFT" in done.stdout
    doc = json.loads(out.read_text())
    assert set(doc["runs"]) == {"frozen (floor)", "peft defaults", "peft bf16 adapters", "gemmbridge bridge",
                                "gemmbridge bridge, bf16 adapters"}  # fmt: skip
    assert all(len(run["losses"]) == 12 and run["step_ms"] > 0 for run in doc["runs"].values())
    assert max(doc["loss_gaps"].values()) < 1e-4  # float32 on the CPU: the same numbers up to rounding
    lora = doc["runs"]["gemmbridge bridge"]["losses"]
    assert lora != doc["runs"]["frozen (floor)"]["losses"]  # the adapters trained
    assert png.stat().st_size > 10_000
