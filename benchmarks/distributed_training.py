"""Train on one and on several GPUs of one host (DDP, FSDP2) against one process, and measure the throughput.

For each mode of ``--modes`` — ``single`` (one process), ``ddp`` (``DistributedDataParallel``) and ``fsdp``
(FSDP2: ``torch.distributed.fsdp.fully_shard`` on each block, then on the model), one process per GPU over NCCL
(``--device cpu``: processes over gloo) — every run of ``--runs`` (named as ``benchmarks/distributed_models.py``
says) trains ``--steps`` steps with AdamW from the same weights on the same global batches, each process taking
its share of the rows. So the losses and the trained parameters of ``ddp`` and ``fsdp`` must be the ``single``
ones (``tests/test_distributed.py``). The blocks model's batch is a global one (strong scaling); the bench Llama's
is 8 × 2048 tokens per GPU (weak scaling).

One JSON (``--json``): card, date, versions, and per run and mode the losses, the median step time (last two
thirds of the steps), tokens/s (all GPUs, and per GPU), peak memory, the dropout masks drawn and, under FSDP2,
how many frozen and trainable parameters are sharded; then each run's tokens/s on all GPUs over one GPU, and each
gemmbridge run's over its plain-torch counterpart's (torch's layers; PEFT without the bridge). ``--params``: the
trainable parameters (whole tensors) before and after training, per mode and run. A mode that fails is reported
and the others still run; the exit status is then 1.

    python benchmarks/distributed_training.py --json dist.json    # bf16, every bench run on 1 and on all GPUs
    python benchmarks/distributed_training.py --device cpu --size test --steps 4 \\
        --runs gemmbridge/fp32 llama+bridge/fp32/adapters-fp32/dropout-0.05
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_models import DTYPES, SIZES, RowMasks, Run, build, logits_of
from torch import nn
from torch.nn import functional as F

SCHEMA = "gemmbridge.distributed-training/2"
METHOD = (
    "per run and mode: the median over the last two thirds of the steps of one step (forward, loss, backward, AdamW, "
    "between device synchronisations); tokens/s = sequences × tokens per sequence / that step"
)
LORAS = ("peft", "bridge", "apply_lora")
BENCH = ["gemmbridge/bf16", "torch/bf16"] + [
    f"llama+{lora}/bf16/adapters-{dtype}" for dtype in DTYPES for lora in LORAS
]


def free_port() -> int:
    """A TCP port nothing listens on now (a fixed one collides with other runs on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tokens_of(step: int, vocab: int, seq: int, batch: int, device: torch.device) -> torch.Tensor:
    """The global batch of ``step``, the same on every process: ``batch`` counting sequences of ``seq + 1`` tokens
    from random starts."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return ((start + torch.arange(seq + 1)) % vocab).to(device)


def sharding(model: nn.Module) -> dict[str, list[int]]:
    """Frozen and trainable parameters: [how many, how many FSDP2 shards on dim 0 with this process's shard smaller
    than the whole]."""
    from torch.distributed.tensor import DTensor, Shard

    counts = {"frozen": [0, 0], "trainable": [0, 0]}
    for p in model.parameters():
        kind = counts["trainable" if p.requires_grad else "frozen"]
        kind[0] += 1
        kind[1] += isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),) and p.to_local().shape[0] < p.shape[0]
    return counts


def full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole (FSDP2 gathers them: every process must call this), on the CPU."""
    whole = {name.removeprefix("module."): p.full_tensor() if hasattr(p, "full_tensor") else p
             for name, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    return {name: p.detach().to("cpu", copy=True) for name, p in whole.items()}


def train(run: Run, mode: str, rank: int, world: int, device: torch.device, args: argparse.Namespace) -> tuple:
    """(this process's row of results, the trainable parameters before and after or None) of one run."""
    size = SIZES[run.size_family][args.size]
    batch = args.batch or size.batch * (world if size.per_rank else 1)
    if batch % world:
        raise ValueError(f"a batch of {batch} does not split over {world} processes")
    rows, cuda = batch // world, device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        # RowMasks makes each process draw its rows' masks as one process would, through torch's bernoulli: the
        # LoRA kernels' own mask (a seed per process) cannot be split by rows, so they are off for these runs
        import gemmbridge

        gemmbridge.set_kernels("off" if run.dropout else "auto")
    torch.manual_seed(0)
    model, blocks = build(run, size, device)
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    initial = full_tensors(model) if args.params else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr)
    losses, times, draws = [], [], 0
    for step in range(args.steps):
        tokens = tokens_of(step, size.vocab, size.seq, batch, device)[rank * rows : (rank + 1) * rows]
        masks = RowMasks(step, rank * rows) if run.dropout else nullcontext()
        sync()
        start = time.perf_counter()
        with masks, torch.autocast(device.type, dtype=run.autocast, enabled=run.autocast is not None):
            logits = logits_of(model, tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, size.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        draws += masks.draws if isinstance(masks, RowMasks) else 0
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    step_s = statistics.median(times[len(times) // 3 :])
    row = {
        "run": run.name, "mode": mode, "world": world, "batch": batch, "seq": size.seq, "steps": args.steps,
        "losses": losses, "median_step_s": step_s, "tokens_per_s": batch * size.seq / step_s,
        "tokens_per_s_per_gpu": batch * size.seq / step_s / world, "mask_draws": draws,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "sharding": sharding(model) if mode == "fsdp" else None,
    }  # fmt: skip
    params = {"initial": initial, "trained": full_tensors(model)} if args.params else None
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, params


def process(rank: int, mode: str, world: int, port: int, args: argparse.Namespace, scratch: str) -> None:
    """One process of ``mode``: every run in turn; rank 0 writes the rows and parameters under ``scratch``."""
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    else:  # a check, not a measurement: one thread each (busy-waiting thread pools on shared cores tripled the time)
        torch.set_num_threads(1)
    if mode != "single":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                          TORCH_SYMM_MEM_DISABLE_MULTICAST="1")  # fmt: skip
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    device = torch.device(args.device, rank if args.device == "cuda" else None)
    rows, params = [], {}
    for name in args.runs:
        row, params[name] = train(Run.parse(name), mode, rank, world, device, args)
        rows.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    if rank == 0:
        Path(scratch, f"{mode}.json").write_text(json.dumps(rows))
        if args.params:
            torch.save(params, Path(scratch, f"{mode}.pt"))
    if mode != "single":
        dist.barrier()  # every process done (rank 0 writes files) before the group goes: gloo aborted an early one
        dist.destroy_process_group()


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each run's tokens/s in each mode over one process's, and each gemmbridge run's over its baseline's."""
    speed = {(row["run"], row["mode"]): row["tokens_per_s"] for row in rows}
    scaling: dict[str, dict[str, float]] = {}
    vs_baseline: dict[str, dict[str, float]] = {}
    for (name, mode), value in speed.items():
        if mode != "single" and (name, "single") in speed:
            scaling.setdefault(name, {})[mode] = value / speed[name, "single"]
        baseline = Run.parse(name).baseline()
        if baseline is not None and (baseline.name, mode) in speed:
            vs_baseline.setdefault(name, {})[mode] = value / speed[baseline.name, mode]
    return {"over_one_process": scaling, "over_baseline": vs_baseline}


def versions(device: str) -> dict[str, Any]:
    import peft
    import transformers
    from skinny_gemms import versions as gemm_versions

    found = {**gemm_versions(device), "transformers": transformers.__version__, "peft": peft.__version__}
    if device == "cuda":
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return found


def table(doc: dict[str, Any]) -> str:
    lines = [f"{'run':42} {'mode':>5} {'GPUs':>4} {'tokens/s':>10} {'per GPU':>10} {'× 1 proc':>8} {'× base':>7} "
             f"{'peak MiB':>9} {'loss':>7}"]  # fmt: skip
    over_one, over_base = doc["summary"]["over_one_process"], doc["summary"]["over_baseline"]
    modes = ("single", "ddp", "fsdp")
    for row in sorted(doc["rows"], key=lambda row: (doc["runs"].index(row["run"]), modes.index(row["mode"]))):
        one = over_one.get(row["run"], {}).get(row["mode"])
        base = over_base.get(row["run"], {}).get(row["mode"])
        peak = "" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        lines.append(f"{row['run']:42} {row['mode']:>5} {row['world']:>4} {row['tokens_per_s']:10.0f} "
                     f"{row['tokens_per_s_per_gpu']:10.0f} {'' if one is None else f'{one:.2f}':>8} "
                     f"{'' if base is None else f'{base:.2f}':>7} {peak:>9} {row['losses'][-1]:7.4f}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=("single", "ddp", "fsdp"), default=["single", "ddp", "fsdp"])
    parser.add_argument("--world", type=int, help="processes of ddp and fsdp (default: every GPU; 2 on the CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo, for a check without GPUs")
    parser.add_argument("--size", choices=("test", "bench"), default="bench")
    parser.add_argument("--runs", nargs="+", default=BENCH, help="run names (benchmarks/distributed_models.py)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, help="sequences per step in all (default: the size's)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--params", help="save the trainable parameters before and after training here (a torch "
                        "file: {mode: {run: {'initial' | 'trained': {name: tensor}}}})")  # fmt: skip
    args = parser.parse_args()
    for name in args.runs:
        Run.parse(name)
    world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    plan = [(mode, 1 if mode == "single" else world) for mode in args.modes if mode == "single" or world > 1]
    # forked processes share this one's imports (torch, transformers, peft: 5 s each on a CPU); CUDA needs spawn
    start = "spawn" if args.device == "cuda" else "fork"
    rows, params, errors = [], {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode, n in plan:
            try:
                mp.start_processes(process, args=(mode, n, free_port(), args, scratch), nprocs=n, start_method=start)
            except Exception as failure:  # a process's exception: its traceback is in the message
                errors[mode] = f"{type(failure).__name__}: {failure}"
                print(f"{mode} on {n} failed:\n{errors[mode]}", file=sys.stderr, flush=True)
                continue
            rows += json.loads(Path(scratch, f"{mode}.json").read_text())
            if args.params:
                params[mode] = torch.load(Path(scratch, f"{mode}.pt"))
    doc = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "gpus": world if args.device == "cuda" else 0,  # those ddp and fsdp ran on
        "versions": versions(args.device),
        "command": " ".join(sys.argv),
        "method": METHOD, "size": args.size, "steps": args.steps, "runs": args.runs, "plan": plan, "errors": errors,
        "rows": rows, "summary": summary(rows),
    }  # fmt: skip
    print(table(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.params:
        torch.save(params, args.params)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
