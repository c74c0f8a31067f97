"""Training soak: many LoRA fine-tune steps of a tiny model whose input shape changes every few steps.

Two runs from the same weights, each ``--steps`` steps of AdamW on next-token prediction over random tokens:
``apply_lora`` (gemmbridge's ``LoRALinear`` on the blocks' linear layers) and ``bridge`` (PEFT's LoRA on the same
layers, through ``gemmbridge.torch.peft.use_gemmbridge``). The batch shape cycles through ``--shapes`` (batch,
length) pairs, changing every ``--every`` steps. Every ``--sample-every`` steps memory is sampled as
``gemmbridge stress`` samples it (after ``gc.collect``, ``malloc_trim`` and emptying torch's caching allocator:
host RSS, torch's live bytes and the device memory in use) together with what gemmbridge holds: the plan cache's
entries and every live plan, vendor plan state and captured CUDA graph (counted over the garbage collector's
objects, wherever they are held). After ``--warmup`` steps every shape has been met more than once, so each
figure must stay flat: its largest value later on, less its largest value up to the warm-up's end, is judged
against a tolerance (``--rss-tolerance-mb``, ``--device-tolerance-mb``; torch's live bytes and plans: 0). The
graphs are a cache that fills within its bound as addresses recur (``GRAPHS_PER_PLAN`` a graph cache: one per plan
of a plan state, a plan per pointer alignment and TF32 setting): at every sample they must be within it; their
growth is reported, not judged.

    python scripts/soak_training.py --json soak.json                         # the GPU: 10,000 steps a run, bf16
    python scripts/soak_training.py --device cpu --steps 60 --every 2 --shapes 3 --warmup 24 --sample-every 6

Exit status 1 when a figure grew past its tolerance.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import gemmbridge
import gemmbridge.torch as gt
from gemmbridge.stress.memory import MIB, mib, sample

VOCAB, WIDTH, HIDDEN, LAYERS, RANK = 128, 64, 256, 2, 8
TARGETS = ["up", "down"]  # the linear layers of each block that get LoRA
BYTES = ("host_rss", "torch_allocated", "device_used")  # the figures in bytes (the others are counts)


class TinyModel(nn.Module):
    """Embedding, ``LAYERS`` residual blocks ``h + down(gelu(up(h)))``, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(WIDTH, HIDDEN), "down": nn.Linear(HIDDEN, WIDTH)}) for _ in range(LAYERS)
        )
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block["down"](F.gelu(block["up"](h)))
        return self.head(h)


def with_apply_lora(model: nn.Module) -> nn.Module:
    names = gt.apply_lora(model, [f"*.{t}" for t in TARGETS], r=RANK, alpha=2 * RANK, dropout=0.05)
    assert len(names) == LAYERS * len(TARGETS), names
    return model


def with_bridge(model: nn.Module) -> nn.Module:
    import peft

    from gemmbridge.torch.peft import use_gemmbridge

    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.05, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    report = use_gemmbridge(model)
    assert len(report.served) == LAYERS * len(TARGETS) and not report.skipped, report
    return model


RUNS = {"apply_lora": with_apply_lora, "bridge": with_bridge}


def shapes(count: int) -> list[tuple[int, int]]:
    """``count`` (batch, length) pairs, from 2 × 16 up, in an order that jumps between small and large."""
    pairs = [(batch, length) for length in (16, 24, 40, 64, 96, 128) for batch in (2, 4, 8)][:count]
    return pairs[::2] + pairs[1::2]


def gemmbridge_objects() -> dict[str, int]:
    """Live plans, CUDA plan states, graph caches and captured graphs, wherever they are held (the garbage collector's
    view), and the layouts the torch layer's launch lane has resolved (its GEMMs' launchers, aten's or gemmbridge's)."""
    from gemmbridge.plan import Plan
    from gemmbridge.torch import lane, lora_kernels

    counts = {"plans": 0, "plan_states": 0, "graph_caches": 0, "graphs": 0,
              "lane_layouts": lane.resolved() + lora_kernels.resolved()}  # fmt: skip
    cuda_state, graph_cache = None, None
    if torch.cuda.is_available():
        from gemmbridge.backends.cuda import PlanState
        from gemmbridge.backends.cuda.graphs import GraphCache

        cuda_state, graph_cache = PlanState, GraphCache
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: that reads __class__, which some objects compute
        if kind is Plan:
            counts["plans"] += 1
        elif kind is cuda_state:
            counts["plan_states"] += 1
        elif kind is graph_cache:
            counts["graph_caches"] += 1
            counts["graphs"] += len(obj.execs)
    return counts


def graph_bound(counts: dict[str, int]) -> int:
    """The most graphs gemmbridge keeps for the graph caches alive: ``GRAPHS_PER_PLAN`` each (none on the CPU)."""
    if not torch.cuda.is_available():
        return 0
    from gemmbridge.backends.cuda.graphs import GRAPHS_PER_PLAN

    return GRAPHS_PER_PLAN * counts["graph_caches"]


def snapshot(device: str, step: int) -> dict[str, int]:
    found = sample(device, ("torch",))
    found.update(gemmbridge_objects())
    found["step"] = step
    return found


def judge(samples: list[dict[str, int]], warmup: int, tolerances: dict[str, int]) -> tuple[dict, dict]:
    """Each figure's growth after the warm-up: its largest value after the first sample at or past step ``warmup``
    less its largest value up to that sample (a cache that churns within a bound, as the graphs do, is judged by its
    bound), and the figures whose growth is over their tolerance (none judged without samples after the warm-up)."""
    first = next((i for i, s in enumerate(samples) if s["step"] >= warmup), len(samples))
    before, after = samples[: first + 1], samples[first + 1 :]
    keys = [k for k in tolerances if after and k in after[0]]
    growth = {k: max(s[k] for s in after) - max(s[k] for s in before) for k in keys}
    return growth, {k: v for k, v in growth.items() if v > tolerances[k]}


def soak(name: str, base: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """One run: the steps, the samples, and each figure's growth after the warm-up against its tolerance."""
    torch.manual_seed(1)
    model = RUNS[name](copy.deepcopy(base)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    pairs = shapes(args.shapes)
    samples, losses, step_seconds = [], [], []
    start = time.perf_counter()
    for step in range(args.steps):
        batch, length = pairs[(step // args.every) % len(pairs)]
        tokens = torch.randint(0, VOCAB, (batch, length + 1), device=args.device)
        begin = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - begin)
        if step % args.sample_every == 0 or step == args.steps - 1:
            losses.append(loss.item())
            samples.append(snapshot(args.device, step))
            if args.progress:
                print(f"{name} step {step}: loss {losses[-1]:.3f}, {samples[-1]}", flush=True)
    tolerances = {
        "host_rss": int(args.rss_tolerance_mb * MIB),
        "device_used": int(args.device_tolerance_mb * MIB),
        **dict.fromkeys(("torch_allocated", "plan_cache", "plans", "plan_states", "lane_layouts"), 0),
    }
    growth, exceeded = judge(samples, args.warmup, tolerances)
    growth["graphs"] = judge(samples, args.warmup, {"graphs": 0})[0].get("graphs", 0)
    over = max(s["graphs"] - graph_bound(s) for s in samples)
    if over > 0:
        exceeded["graphs_over_bound"] = over
    return {
        "run": name,
        "seconds": time.perf_counter() - start,
        "step_ms_median": 1e3 * statistics.median(step_seconds),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "samples": samples,
        "judged_from_step": next((s["step"] for s in samples if s["step"] >= args.warmup), None),
        "growth": growth,
        "tolerance": {k: tolerances[k] for k in growth if k in tolerances},
        "graphs_most_over_bound": over,
        "exceeded": exceeded,
        "ok": bool(growth) and not exceeded and all(math.isfinite(v) for v in losses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10_000, help="steps of each run")
    parser.add_argument("--every", type=int, default=5, help="steps between shape changes")
    parser.add_argument("--shapes", type=int, default=12, help="distinct (batch, length) pairs, cycled")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the judged part (default: 10 %%)")
    parser.add_argument("--sample-every", type=int, default=250)
    parser.add_argument("--rss-tolerance-mb", type=float, default=8.0)
    parser.add_argument("--device-tolerance-mb", type=float, default=64.0)  # as gemmbridge stress
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated: " + ", ".join(RUNS))
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    base = TinyModel().to(args.device, dtype)
    results = [soak(name, base, args) for name in args.runs.split(",")]
    for r in results:
        grown = ", ".join(f"{k} {mib(v) if k in BYTES else f'{v:+d}'}" for k, v in r["growth"].items())
        print(f"{r['run']}: {args.steps} steps in {r['seconds']:.1f} s ({r['step_ms_median']:.2f} ms/step median), "
              f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}; growth after step {r['judged_from_step']}: "
              f"{grown}; {'ok' if r['ok'] else 'EXCEEDED ' + str(r['exceeded'])}")  # fmt: skip
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "gemmbridge": gemmbridge.__version__},
        "options": {k: v for k, v in vars(args).items() if k not in ("json", "progress")},
        "dtype": str(dtype),
        "shapes": shapes(args.shapes),
        "runs": results,
        "ok": all(r["ok"] for r in results),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
