"""DDP and FSDP2 training of gemmbridge modules on two GPUs (or two CPU processes over gloo, in CI): the same
losses and parameters as on one device."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed_training.py"


def free_port() -> int:
    """A TCP port nothing listens on now (a fixed one collides with other runs on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train(mode: str, tmp_path: Path, world: int, device: str, lora: int) -> tuple[list[float], dict]:
    out = tmp_path / f"{mode}.json"
    params = tmp_path / f"{mode}.pt"
    args = [sys.executable, str(SCRIPT), "--mode", mode, "--world", str(world), "--steps", "8", "--device", device,
            "--port", str(free_port()), "--json", str(out), "--params", str(params), "--lora", str(lora),
            "--lr", "3e-2" if lora else "1e-3"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())["losses"], torch.load(params)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_two_process_training_matches_one_process(mode, device, lora, tmp_path):
    """Full training, and LoRA (``LoRALinear`` on the attention projections, everything else frozen)."""
    if device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        pytest.skip("needs two GPUs")
    ref_losses, ref_params = train("single", tmp_path, 1, device, lora)
    losses, params = train(mode, tmp_path, 2, device, lora)
    assert losses[-1] < losses[0], "the model did not learn"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-3, atol=1e-4, msg=name)
