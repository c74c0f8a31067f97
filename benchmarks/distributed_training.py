"""Train a small transformer-style model built from gemmbridge modules on 1 or more GPUs of one host.

``--mode single`` trains on one GPU; ``--mode ddp`` with ``DistributedDataParallel`` and ``--mode fsdp``
with FSDP2 (``torch.distributed.fsdp.fully_shard``), over NCCL, one process per GPU. Every mode sees the
same global batches (each rank takes its share), so the losses and the trained parameters must match the
single-GPU run. Writes the losses, the parameters (``--params``, a torch file) and the throughput.

    python benchmarks/distributed_training.py --mode ddp --world 2 --json ddp.json --params ddp.pt
    python benchmarks/distributed_training.py --mode ddp --world 2 --size bench --dtype bf16 --steps 30
    python benchmarks/distributed_training.py --mode fsdp --world 2 --lora 8     # LoRA: only the adapters train
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import gemmbridge.torch as gt

SIZES = {  # d, layers, heads, sequence, global batch, vocab
    "test": (64, 2, 4, 32, 8, 97),
    "bench": (1024, 8, 16, 1024, 16, 4096),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = gt.Linear(d, 3 * d)
        self.proj = gt.Linear(d, d)
        self.mlp = gt.MLP(d, 4 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attention)
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = gt.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batch(step: int, size: str, device: torch.device) -> torch.Tensor:
    """The global batch of ``step``: the same tokens on every rank (a counting task with noise)."""
    _, _, _, t, n, vocab = SIZES[size]
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return ((start + torch.arange(t + 1)) % vocab).to(device)


def train(rank: int, args: argparse.Namespace) -> None:
    world = args.world
    if args.mode != "single":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), NCCL_NVLS_ENABLE="0",
                          TORCH_SYMM_MEM_DISABLE_MULTICAST="1")  # fmt: skip
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(args.device, rank if args.device == "cuda" else None)
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    d, layers, heads, _, n, vocab = SIZES[args.size]
    torch.manual_seed(0)
    model = Model(d, layers, heads, vocab).to(device)
    if args.lora:  # LoRA on the attention projections; everything else frozen
        gt.apply_lora(model, ["blocks.*.qkv", "blocks.*.proj"], r=args.lora, alpha=2 * args.lora)
    if args.mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if args.device == "cuda" else None)
    elif args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    losses, times = [], []
    for step in range(args.steps):
        tokens = batch(step, args.size, device)[rank * n // world : (rank + 1) * n // world]
        sync()
        t0 = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
              for name, p in model.named_parameters()}  # fmt: skip
    if rank == 0:
        steady = sorted(times[len(times) // 3 :])
        step_s = steady[len(steady) // 2]
        t = SIZES[args.size][3]
        result = {
            "mode": args.mode, "world": world, "size": args.size, "dtype": args.dtype, "steps": args.steps,
            "lora": args.lora, "losses": losses, "median_step_s": step_s, "tokens_per_s": n * t / step_s,
            "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
        }  # fmt: skip
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.params:
            torch.save({k.removeprefix("module."): v for k, v in params.items()}, args.params)
    if args.mode != "single":
        dist.barrier()  # both ranks done (rank 0 writes files) before the group goes: gloo aborted an early one
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("single", "ddp", "fsdp"), default="single")
    parser.add_argument("--world", type=int, default=1, help="GPUs (processes); single mode uses 1")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo, for a check without GPUs")
    parser.add_argument("--size", choices=tuple(SIZES), default="test")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora", type=int, default=0, help="LoRA of this rank on qkv and proj (0: full training)")
    parser.add_argument("--port", type=int, default=29511)
    parser.add_argument("--json")
    parser.add_argument("--params", help="save the trained parameters (full tensors) here")
    args = parser.parse_args()
    if args.mode == "single":
        args.world = 1
        train(0, args)
    else:
        mp.spawn(train, args=(args,), nprocs=args.world)


if __name__ == "__main__":
    main()
