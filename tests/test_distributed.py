"""DDP and FSDP2 against one process (``benchmarks/distributed_training.py``): two CPU processes over gloo in CI,
every GPU of the machine over NCCL (marked ``gpu``).

One launch of the script per device trains every run below in each mode; each test compares one run's losses
and trained parameters under DDP or FSDP2 with the one-process run on the whole batch. The runs: full training
of the gemmbridge transformer, ``apply_lora`` on it, and a small ``transformers`` Llama with LoRA through
``apply_lora``, through PEFT with the bridge (``use_gemmbridge``) and through PEFT alone, in float32 and bfloat16
with float32 and bfloat16 adapters, with and without dropout (``RowMasks`` makes each process's masks the ones
the one process draws for its rows).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed_training.py"
STEPS = {"cpu": 4, "cuda": 20}
LLAMA = [
    f"llama+{lora}/{dtype}/adapters-{adapters}{dropout}"
    for lora in ("apply_lora", "bridge")
    for dtype, adapters in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"))
    for dropout in ("", "/dropout-0.05")
]
RUNS = ["gemmbridge/fp32", "gemmbridge+apply_lora/fp32/adapters-fp32", *LLAMA, "llama+peft/fp32/adapters-fp32"]
LORA_LAYERS = {"gemmbridge": 2 * 2, "llama": 2 * 7}  # the test size's layers × LoRA layers in each


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, dict]:
    """(device, the script's JSON, the trainable parameters {mode: {run: {"initial" | "trained": {name: tensor}}}})
    of one launch."""
    device = request.param
    world = 2 if device == "cpu" else torch.cuda.device_count()
    if device == "cuda" and world < 2:
        pytest.skip("needs two GPUs")
    out = tmp_path_factory.mktemp(f"distributed-{device}")
    args = [sys.executable, str(SCRIPT), "--device", device, "--world", str(world), "--size", "test",
            "--batch", str(2 * world), "--steps", str(STEPS[device]), "--runs", *RUNS,
            "--json", str(out / "runs.json"), "--params", str(out / "params.pt")]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert (out / "runs.json").exists(), done.stdout[-5000:] + done.stderr[-5000:]
    return device, json.loads((out / "runs.json").read_text()), torch.load(out / "params.pt")


def tolerance(run: str) -> dict[str, float]:
    """The largest gap from the one-process run allowed: in each step's loss, relative to it; in the trained
    parameters (all of them as one vector), relative to how far training moved them.

    float32: the rows' gradients are summed in another order (two partial sums, then the all-reduce), which moves
    the last bits, and AdamW carries that on (seen on the CPU: 1e-7 in the loss, 1e-4 in the parameters, the
    most where a gradient is zero but for rounding, as the key bias's). bfloat16 (8 bits): the reordered gradients
    of bfloat16 adapters are rounded to bfloat16 in each process and in the all-reduce, every AdamW step is
    rounded to the bfloat16 weights, and on a GPU a GEMM over fewer rows may take another kernel (seen on the CPU
    after 4 and 20 steps: 3e-2 in the parameters, 5e-5 in the loss). A process that misses the other's rows, or
    draws other dropout masks, puts the parameters 70-130 % of their movement away."""
    if "/bf16" in run:
        return {"loss": 1e-2, "params": 0.15}
    return {"loss": 1e-4, "params": 1e-3}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for _, t in sorted(tensors.items())])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("run", RUNS)
def test_training_on_several_processes_matches_one_process(trained, run, mode):
    device, doc, params = trained
    assert mode not in doc["errors"], doc["errors"][mode]
    rows = {(row["run"], row["mode"]): row for row in doc["rows"]}
    want, got = rows[run, "single"], rows[run, mode]
    start, trained_alone, trained_here = (params["single"][run]["initial"], params["single"][run]["trained"],
                                          params[mode][run]["trained"])  # fmt: skip
    assert trained_here.keys() == trained_alone.keys() == start.keys()
    unmoved = [name for name, p in trained_alone.items() if torch.equal(p, start[name])]
    assert not unmoved, f"training did not move {unmoved}"
    tol = tolerance(run)
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want["losses"]))
    params_gap = ((flat(trained_here) - flat(trained_alone)).norm() / (flat(trained_alone) - flat(start)).norm()).item()
    print(f"{device} {mode} {run}: largest loss gap {loss_gap:.2e}; parameters {params_gap:.2e} of their movement")
    assert loss_gap < tol["loss"], (got["losses"], want["losses"])
    assert params_gap < tol["params"]
    draws = STEPS[device] * LORA_LAYERS[run.split("/")[0].split("+")[0]] if "/dropout-" in run else 0
    assert got["mask_draws"] == want["mask_draws"] == draws
    if mode == "fsdp":  # every parameter sharded, the frozen ones and the adapters: rank 0 holds part of each
        frozen, trainable = got["sharding"]["frozen"], got["sharding"]["trainable"]
        assert trainable[0] > 0 and trainable[0] == trainable[1], got["sharding"]
        assert frozen[0] == frozen[1] and (frozen[0] > 0) == ("+" in run), got["sharding"]


def test_the_results_name_card_date_versions_and_the_ratios(trained):
    device, doc, _ = trained
    assert doc["schema"] == "gemmbridge.distributed-training/2" and doc["date"] and doc["card"]
    assert {"torch", "transformers", "peft", "gemmbridge"} <= doc["versions"].keys()
    modes = ("single", "ddp", "fsdp")
    assert {(row["run"], row["mode"]) for row in doc["rows"]} == {(run, mode) for run in RUNS for mode in modes}
    assert all(row["tokens_per_s"] > 0 for row in doc["rows"])
    assert doc["summary"]["over_one_process"].keys() == set(RUNS)
    on_peft = {"llama+bridge/fp32/adapters-fp32", "llama+apply_lora/fp32/adapters-fp32"}  # their baseline ran too
    assert doc["summary"]["over_baseline"].keys() == on_peft
    assert all(doc["summary"]["over_baseline"][run].keys() == {"single", "ddp", "fsdp"} for run in on_peft)
