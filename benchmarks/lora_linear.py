"""LoRA linear layer on one CUDA card: forward + backward time and the forward's extra peak memory, every candidate
in the same run, against the frozen layer.

The frozen layer (the floor) is ``y = x · Wᵀ`` with x requiring grad: the forward GEMM and the input-gradient GEMM.
Candidates on the same x, W, A, B (bf16 activations and W, d × d, no bias):

- ``peft defaults``: a ``peft`` LoRA ``Linear`` as ``get_peft_model`` makes it (adapters upcast to float32, so the
  LoRA path runs on a float32 copy of x);
- ``peft bf16 adapters``: the same with ``autocast_adapter_dtype=False``;
- ``composite eager`` / ``composite compile``: ``F.linear(x, W) + s · B(A(dropout(x)))`` in torch ops, eager and
  under ``torch.compile(dynamic=True)`` (one compilation for all shapes);
- ``gemmbridge bf16 adapters`` / ``gemmbridge fp32 adapters``: ``gemmbridge.torch.lora_linear``;
- ``gemmbridge via peft bridge``: PEFT's float32-adapter layer routed by ``gemmbridge.torch.peft.use_gemmbridge``.

Each step sets grads to None, runs the forward and ``backward(dy)`` (x, A and B get gradients; W none). At dropout
0 every candidate's output and gradients are first checked against a float64 composite. Time: the median of
``triton.testing.do_bench`` (CUDA events, L2 flushed), candidates interleaved, best of two rounds; and the GPU's
own time: five steps captured in one CUDA graph, the median of ten replays (``graph_ms``; on the lent H200 a GEMM
launch costs the host 17–36 µs, so eager steps at T = 4096 are host-bound). Memory: the
forward's peak allocation above what was allocated before it (the output included), in MiB and in units of the
output's size. gemmbridge's cuBLASLt workspace comes from CUDA's own pool, outside torch's statistics.

    python benchmarks/lora_linear.py --json benchmarks/results/<date>-<card>-lora-linear.json   # ~5 min, H200
    python benchmarks/lora_linear.py --quick                                                  # T = 4096, r = 16
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
from collections.abc import Callable
from typing import Any

import peft
import torch
import transformers
import triton.testing
from torch import Tensor, nn
from torch.nn import functional as F

import gemmbridge.torch as gt
from gemmbridge import info
from gemmbridge.bench import timing
from gemmbridge.torch.peft import use_gemmbridge

DTYPE = torch.bfloat16
Step = Callable[[], Tensor]


def composite(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
    """The plain LoRA composite, as PEFT computes it with adapters in x's dtype."""
    return F.linear(x, w) + F.linear(F.linear(F.dropout(x, p), a), b) * scale


COMPILED = torch.compile(composite, dynamic=True)


def peft_layer(w: Tensor, a: Tensor, b: Tensor, r: int, p: float, fp32_adapters: bool) -> nn.Module:
    """PEFT's LoRA Linear around a bf16 ``nn.Linear`` holding ``w``, its adapters set to ``a``, ``b``."""
    base = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=DTYPE))
    base[0].weight.data = w
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"])
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=fp32_adapters)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return model


def candidates(x: Tensor, w: Tensor, a: Tensor, b: Tensor, r: int, p: float) -> dict[str, tuple[Step, list[Tensor]]]:
    """name -> (forward, the tensors whose gradients the step makes besides x)."""
    scale = 2.0
    a32, b32 = (t.detach().float().requires_grad_() for t in (a, b))
    peft32, peft16 = peft_layer(w, a, b, r, p, True), peft_layer(w, a, b, r, p, False)
    bridged = copy.deepcopy(peft32)
    use_gemmbridge(bridged)

    def adapters(model: nn.Module) -> list[Tensor]:
        return [q for q in model.parameters() if q.requires_grad]

    return {
        "frozen layer": (lambda: F.linear(x, w), []),
        "peft defaults": (lambda: peft32(x), adapters(peft32)),
        "peft bf16 adapters": (lambda: peft16(x), adapters(peft16)),
        "composite eager": (lambda: composite(x, w, a, b, scale, p), [a, b]),
        "composite compile": (lambda: COMPILED(x, w, a, b, scale, p), [a, b]),
        "gemmbridge bf16 adapters": (lambda: gt.lora_linear(x, w, None, a, b, scale, p), [a, b]),
        "gemmbridge fp32 adapters": (lambda: gt.lora_linear(x, w, None, a32, b32, scale, p), [a32, b32]),
        "gemmbridge via peft bridge": (lambda: bridged(x), adapters(bridged)),
    }


def rel(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check(forward: Step, grads_of: list[Tensor], x: Tensor, w: Tensor, a: Tensor, b: Tensor, dy: Tensor) -> float:
    """Largest relative error of y, dx, dA, dB (at dropout 0) against the float64 composite (the frozen layer's
    y and dx against ``x · Wᵀ`` in float64)."""
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = composite(x64, w.double(), a64, b64, 2.0, 0.0) if grads_of else F.linear(x64, w.double())
    y64.backward(dy.double())
    x.grad = None
    for t in grads_of:
        t.grad = None
    y = forward()
    y.backward(dy)
    errors = [rel(y, y64), rel(x.grad, x64.grad)]
    if grads_of:  # the adapters' gradients, in the order (A, B)
        errors += [rel(grads_of[0].grad, a64.grad), rel(grads_of[1].grad, b64.grad)]
    return max(errors)


def step_of(forward: Step, grads_of: list[Tensor], x: Tensor, dy: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for t in grads_of:
            t.grad = None
        forward().backward(dy)

    return step


GRAPH_STEPS, GRAPH_REPLAYS = 5, 10


def graph_ms(step: Callable[[], None]) -> float | str:
    """ms per step of ``GRAPH_STEPS`` steps captured in one torch CUDA graph, the median of ``GRAPH_REPLAYS``
    event-timed replays (``gemmbridge.bench.timing.gpu_us_per_op``): the GPU's time without the host's launch cost
    (what CUDA graphs, e.g. ``torch.compile(mode="reduce-overhead")``, give). A step that cannot be captured: why."""
    try:
        return timing.gpu_us_per_op(step, "torch", calls=GRAPH_STEPS, replays=GRAPH_REPLAYS) / 1e3
    except Exception as error:  # reported, not fatal: the eager timing stands
        torch.cuda.synchronize()
        return f"not captured: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def forward_peak_mib(forward: Step) -> float:
    """The forward's peak allocation above what was allocated before it, output included."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = forward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del y
    return peak / 2**20


def config_rows(t: int, d: int, r: int, p: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    x = torch.randn(t, d, device="cuda", dtype=DTYPE, requires_grad=True)
    w = torch.randn(d, d, device="cuda", dtype=DTYPE) / d**0.5
    a = (torch.randn(r, d, device="cuda", dtype=DTYPE) / d**0.5).requires_grad_()
    b = (torch.randn(d, r, device="cuda", dtype=DTYPE) / r**0.5).requires_grad_()
    dy = torch.randn(t, d, device="cuda", dtype=DTYPE)
    cands = candidates(x, w, a, b, r, p)
    errors = {name: check(fn, g, x, w, a, b, dy) for name, (fn, g) in cands.items()} if p == 0 else {}
    steps = {name: step_of(fn, g, x, dy) for name, (fn, g) in cands.items()}
    ms = dict.fromkeys(steps, float("inf"))
    for _ in range(2):  # interleaved rounds, best median kept
        for name, step in steps.items():
            step()
            ms[name] = min(ms[name], triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    graphed = {name: graph_ms(step) for name, step in steps.items()}
    floor = graphed["frozen layer"]
    output_mib = t * d * x.element_size() / 2**20
    rows = []
    for name, (fn, _) in cands.items():
        peak = forward_peak_mib(fn)
        g = graphed[name]
        g_pct = 100 * (g / floor - 1) if isinstance(g, float) and isinstance(floor, float) else None
        row = {"t": t, "d": d, "r": r, "dropout": p, "candidate": name, "ms": ms[name],
               "overhead_pct": 100 * (ms[name] / ms["frozen layer"] - 1), "graph_ms": g if isinstance(g, float)
               else None, "graph_overhead_pct": g_pct, "graph_reason": None if isinstance(g, float) else g,
               "forward_peak_mib": peak, "forward_peak_vs_output": peak / output_mib,
               "max_rel_err_vs_fp64": errors.get(name)}  # fmt: skip
        rows.append(row)
        err = "" if name not in errors else f"  err {errors[name]:.1e}"
        graph = f"graph {g:6.3f} ms {g_pct:+6.1f} %" if g_pct is not None else "graph -".ljust(25)
        print(f"T={t:6} r={r:3} p={p:.1f} {name:27} {ms[name]:7.3f} ms {row['overhead_pct']:+7.1f} %  {graph}  "
              f"fwd peak {peak:7.1f} MiB ({row['forward_peak_vs_output']:.2f}× y){err}", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst overhead and forward peak of each candidate over every configuration."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(row["candidate"] for row in rows):
        mine = [row for row in rows if row["candidate"] == name]
        graphed = [row["graph_overhead_pct"] for row in mine if row["graph_overhead_pct"] is not None]
        out[name] = {"max_overhead_pct": max(row["overhead_pct"] for row in mine),
                     "min_overhead_pct": min(row["overhead_pct"] for row in mine),
                     "max_graph_overhead_pct": max(graphed) if graphed else None,
                     "min_graph_overhead_pct": min(graphed) if graphed else None,
                     "max_forward_peak_vs_output": max(row["forward_peak_vs_output"] for row in mine)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--dropouts", default="0,0.1")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="T = 4096, r = 16 only")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.ranks = "4096", "16"
    rows = []
    for t in (int(v) for v in args.tokens.split(",")):
        for r in (int(v) for v in args.ranks.split(",")):
            for p in (float(v) for v in args.dropouts.split(",")):
                rows += config_rows(t, args.d, r, p)
    table = summary(rows)
    for name, s in table.items():
        graph = (f"graph {s['min_graph_overhead_pct']:+6.1f} … {s['max_graph_overhead_pct']:+6.1f} %"
                 if s["max_graph_overhead_pct"] is not None else "graph -")  # fmt: skip
        print(f"{name:27} overhead {s['min_overhead_pct']:+6.1f} … {s['max_overhead_pct']:+6.1f} %, {graph}, "
              f"forward peak ≤ {s['max_forward_peak_vs_output']:.2f}× y")  # fmt: skip
    doc = {
        "schema": "gemmbridge.lora-linear/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0),
        "versions": {
            **info.versions(),
            **info.cuda_versions(),
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
        "dtype": "bfloat16 activations and W; adapters bf16 or fp32 as the candidate says",
        "method": "fwd + bwd(dy): triton.testing.do_bench median (CUDA events, L2 flushed) over 100 ms after 25 ms "
        "warm-up, 2 interleaved rounds, best kept; overhead = ms / frozen layer's ms - 1; graph_ms: 5 steps "
        "captured in one CUDA graph, median of 10 replays (the GPU's time, no host launch cost); forward peak = max "
        "allocated during the forward minus allocated before it (output included); correctness at dropout 0 "
        "against a float64 composite",
        "candidates": list(table),
        "rows": rows,
        "summary": table,
        "target": {"overhead_pct": 12, "forward_peak_vs_output": 1.1},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
