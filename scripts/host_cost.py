"""Host µs per call of gemmbridge's training paths against torch's: every row in one process, interleaved.

Rows (bf16, T = 64, d = 2048, r = 16 unless named: small enough that on a GPU every row is host-bound):

- ``matmul``: ``gb.matmul`` against ``torch.matmul``, fp32 64³ and bf16 1024³ (the latter CUDA only);
- ``GEMM …``: the LoRA layer's three GEMMs (``x · Wᵀ``, ``x · Aᵀ``, ``xa · Bᵀ``): ``F.linear`` under ``no_grad``,
  ``F.linear`` with x requiring grad, and the launch lane's GEMM where ``gemmbridge.torch.lane`` exists
  (``lane_gemm`` below is the one place that names its entry);
- ``LoRA step``: forward and ``backward(dy)`` at T = 64, x requiring grad: the frozen ``nn.Linear``, PEFT's LoRA
  ``Linear`` (bf16 adapters), the aten reference (``benchmarks/lora_e2e.py``'s ``AtenLoRA``) and
  ``gemmbridge.torch.LoRALinear``;
- ``compiled …``: ``torch.compile`` of a function that calls one op (``F.linear``, then gemmbridge's ``linear``,
  ``mlp``, ``lora_linear``, ``matmul``), called with x requiring grad (forward only) and under ``no_grad``.

Timing: a row's sample is ``calls`` calls back to back without a synchronize, then one, divided by ``calls``
(``calls`` fixed per row so that a sample lasts about ``--sample-ms``), after warm-up calls. Each round takes one
sample of every row, the order rotated from round to round; a row reports the best and the median of its rounds.
Ratios and targets use the medians. On the CPU (torch CPU tensors) the CUDA-only rows are skipped.

    python scripts/host_cost.py --json benchmarks/results/<date>-<card>-host-cost.json    # ~1 min on an H200
    python scripts/host_cost.py --d 64 --rounds 2 --compile-backend aot_eager              # a CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from lora_e2e import rotated, use_aten, versions  # noqa: E402  (the aten reference and shared helpers)

import gemmbridge as gb  # noqa: E402
import gemmbridge.torch as gt  # noqa: E402

Call = Callable[[], Any]
SCALE = 2.0  # LoRA's alpha / r


def lane_gemm(x: Tensor, w: Tensor) -> Call:
    """The launch lane's GEMM ``y = x · Wᵀ`` as a call of no arguments; the one place that names the lane's API
    (``gemmbridge.torch.lane``). ImportError where the lane does not exist."""
    from gemmbridge.torch import lane

    return lambda: lane.gemm(x, w, None, None, None, False, True, 1.0, 0.0, "none", None)


@dataclass
class Row:
    """One timed call; ``skipped`` says why it was not timed."""

    group: str
    name: str
    call: Call | None = None
    skipped: str | None = None
    no_grad: bool = False  # the calls run under torch.no_grad() (entered once a sample, not once a call)
    calls: int = 0
    samples: list[float] = field(default_factory=list)


def peft_lora(linear: nn.Linear, r: int, b: Tensor) -> nn.Module:
    """PEFT's LoRA ``Linear`` layer (bf16 adapters, alpha 2r, dropout 0) around ``linear``, its B set to ``b``."""
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["0"])
    layer = peft.get_peft_model(nn.Sequential(linear), config, autocast_adapter_dtype=False).base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(b)
    return layer


def step(layer: Callable[[Tensor], Tensor], x: Tensor, dy: Tensor, params: list[Tensor]) -> Call:
    """One forward and ``backward(dy)``; the gradients of ``x`` and ``params`` cleared first."""

    def run() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(dy)

    return run


def build_rows(t: int, d: int, r: int, device: str, backend: str, compiled: list[str]) -> list[Row]:
    """Every row, its call made (not yet run); rows this device cannot run are skipped with the reason."""
    cuda = device == "cuda"
    bf16 = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = bf16, scale: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype) * scale

    rows: list[Row] = []
    for label, n, dtype, gpu_only in (("fp32 64³", 64, torch.float32, False), ("bf16 1024³", 1024, bf16, True)):
        a, b = randn(n, n, dtype=dtype), randn(n, n, dtype=dtype)
        skip = "CUDA only" if gpu_only and not cuda else None
        for name, call in (("torch.matmul", lambda a=a, b=b: torch.matmul(a, b)),
                           ("gb.matmul", lambda a=a, b=b: gb.matmul(a, b))):  # fmt: skip
            rows.append(Row(f"matmul {label}", name, None if skip else call, skip))

    x, dy = randn(t, d), randn(t, d)
    xg = x.clone().requires_grad_()
    w, a, b = randn(d, d, scale=d**-0.5), randn(r, d, scale=d**-0.5), randn(d, r, scale=0.1 * r**-0.5)
    xa = randn(t, r)
    for label, inp, weight in (("x·Wᵀ", x, w), ("x·Aᵀ", x, a), ("xa·Bᵀ", xa, b)):
        group = f"GEMM {label} ({t}×{inp.shape[1]}→{weight.shape[0]})"
        grad_inp = inp.clone().requires_grad_()
        rows.append(Row(group, "F.linear, x requires grad", lambda i=grad_inp, wt=weight: F.linear(i, wt)))
        rows.append(Row(group, "F.linear, no_grad", lambda i=inp, wt=weight: F.linear(i, wt), no_grad=True))
        try:  # under no_grad, as inside the autograd.Function that calls it
            rows.append(Row(group, "lane GEMM", lane_gemm(inp, weight), no_grad=True))
        except ImportError as missing:
            rows.append(Row(group, "lane GEMM", skipped=f"gemmbridge.torch.lane: {missing}"))

    linear = nn.Linear(d, d, bias=False, device=device, dtype=bf16).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(w)
    aten, ours = peft_lora(linear, r, b), gt.LoRALinear.from_linear(linear, r, alpha=2 * r)
    use_aten(aten)
    with torch.no_grad():
        ours.lora_b.copy_(b)
    layers = {"frozen nn.Linear": linear, "PEFT LoRA Linear, bf16 adapters": peft_lora(linear, r, b),
              "aten LoRA Function": aten, "gemmbridge LoRALinear": ours}  # fmt: skip
    for name, layer in layers.items():
        params = [p for p in layer.parameters() if p.requires_grad]
        rows.append(Row(f"LoRA step T={t}", name, step(layer, xg, dy, params)))

    a_g, b_g = a.clone().requires_grad_(), b.clone().requires_grad_()
    ops: dict[str, Callable[..., Tensor]] = {
        "F.linear": lambda x, w, a, b: F.linear(x, w),
        "gemmbridge linear": lambda x, w, a, b: gt.linear(x, w),
        "gemmbridge mlp": lambda x, w, a, b: gt.mlp(x, w, None, w, None),
        "gemmbridge lora_linear": lambda x, w, a, b: gt.lora_linear(x, w, None, a, b, SCALE),
        "gemmbridge matmul": lambda x, w, a, b: gt.matmul(x, w, transpose_b=True),
    }
    for kind in compiled:
        for name, op in ops.items():
            fn = torch.compile(op, backend=backend)
            if kind == "grad":
                rows.append(Row("compiled, x requires grad", name, lambda fn=fn: fn(xg, w, a_g, b_g)))
            else:
                rows.append(Row("compiled, no_grad", name, lambda fn=fn: fn(x, w, a, b), no_grad=True))
    return rows


def sample(row: Row, sync: Call) -> float:
    """µs per call of ``row.calls`` calls without a synchronize, then one."""
    assert row.call is not None
    with torch.set_grad_enabled(not row.no_grad):
        t0 = time.perf_counter()
        for _ in range(row.calls):
            row.call()
        sync()
        return (time.perf_counter() - t0) / row.calls * 1e6


def prepare(row: Row, sync: Call, sample_ms: float) -> None:
    """Warm ``row`` up (compiling, planning, caching) and fix its ``calls``; a call that fails skips the row."""
    assert row.call is not None
    try:
        with torch.set_grad_enabled(not row.no_grad):
            for _ in range(3):
                row.call()
        sync()
    except Exception as error:  # reported in the row: the other rows stand
        row.call, row.skipped = None, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return
    row.calls = 10
    once = sample(row, sync) * 1e-6
    row.calls = max(3, min(20000, int(sample_ms * 1e-3 / once)))
    sample(row, sync)  # one more, untimed: caches and clocks settled at the sample's pace


# (group prefix, row, reference row, limit, how): the host targets; "ratio" or "µs over" the reference
HOST_TARGETS = [
    ("matmul fp32 64³", "gb.matmul", "torch.matmul", 0.80, "ratio"),
    ("matmul bf16 1024³", "gb.matmul", "torch.matmul", 0.80, "ratio"),
    ("GEMM", "lane GEMM", "F.linear, x requires grad", 0.60, "ratio"),
    ("LoRA step", "gemmbridge LoRALinear", "PEFT LoRA Linear, bf16 adapters", 1.0, "ratio"),
    ("compiled", "gemmbridge linear", "F.linear", 5.0, "µs over"),
    ("compiled", "gemmbridge mlp", "F.linear", 5.0, "µs over"),
    ("compiled", "gemmbridge lora_linear", "F.linear", 5.0, "µs over"),
    ("compiled", "gemmbridge matmul", "F.linear", 5.0, "µs over"),
]


def summarize(rows: list[Row]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows as JSON, and every target whose two rows were timed (median against median), met or not."""
    out = []
    for row in rows:
        entry: dict[str, Any] = {"group": row.group, "name": row.name}
        if row.samples:
            entry |= {"us_best": min(row.samples), "us_median": statistics.median(row.samples),
                      "us_rounds": row.samples, "calls": row.calls}  # fmt: skip
        else:
            entry["skipped"] = row.skipped
        out.append(entry)
    timed = {(r["group"], r["name"]): r["us_median"] for r in out if "us_median" in r}
    found = []
    for prefix, name, reference, limit, how in HOST_TARGETS:
        for group in dict.fromkeys(g for g, _ in timed if g.startswith(prefix)):
            if (group, name) in timed and (group, reference) in timed:
                mine, ref = timed[group, name], timed[group, reference]
                value = mine / ref if how == "ratio" else mine - ref
                found.append({"group": group, "row": name, "reference": reference, "how": how, "value": value,
                              "limit": limit, "met": value <= limit})  # fmt: skip
    return out, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=int, default=64, help="tokens of the LoRA-shape rows")
    parser.add_argument("--d", type=int, default=2048, help="the LoRA layer's width")
    parser.add_argument("--r", type=int, default=16, help="the LoRA rank")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample-ms", type=float, default=20.0, help="about how long one sample of a row lasts")
    parser.add_argument("--compiled", default="grad,no_grad", help="compiled rows: grad, no_grad, both or none")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when torch sees one")
    parser.add_argument("--json", help="where to write the figures")
    args = parser.parse_args()
    compiled = [k for k in args.compiled.split(",") if k and k != "none"]
    if any(k not in ("grad", "no_grad") for k in compiled) or args.rounds < 1:
        parser.error("--compiled takes grad, no_grad (comma-separated) or none; --rounds ≥ 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync: Call = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch._dynamo.config.cache_size_limit = 64

    rows = build_rows(args.t, args.d, args.r, device, args.compile_backend, compiled)
    for row in rows:
        if row.call is not None:
            prepare(row, sync, args.sample_ms)
    timed = [row for row in rows if row.call is not None]
    for i in range(args.rounds):
        for row in rotated(timed, i, args.rounds):
            row.samples.append(sample(row, sync))
    table, found = summarize(rows)

    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"host µs per call, {card}, {args.rounds} rounds (best / median; × the group's first row, medians)")
    firsts: dict[str, float] = {}
    for entry in table:
        if "skipped" in entry:
            print(f"  {entry['group']:34} {entry['name']:34} skipped: {entry['skipped']}")
            continue
        first = firsts.setdefault(entry["group"], entry["us_median"])
        print(f"  {entry['group']:34} {entry['name']:34} {entry['us_best']:9.2f} {entry['us_median']:9.2f} "
              f"{entry['us_median'] / first:7.3f}×")  # fmt: skip
    print("targets:")
    for t in found:
        value = f"{t['value']:.3f}×" if t["how"] == "ratio" else f"{t['value']:+.2f} µs"
        print(f"  {'met    ' if t['met'] else 'NOT MET'} {t['group']:34} {t['row']} vs {t['reference']}: {value} "
              f"(limit {t['limit']:g}{'×' if t['how'] == 'ratio' else ' µs'})")  # fmt: skip
    doc = {
        "schema": "gemmbridge.host-cost/1",
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "config": {
            "t": args.t,
            "d": args.d,
            "r": args.r,
            "rounds": args.rounds,
            "sample_ms": args.sample_ms,
            "compiled": compiled,
            "compile_backend": args.compile_backend,
            "device": device,
        },
        "method": "a sample: calls back to back without a synchronize, then one, / calls; one sample of every row "
        "per round, the order rotated each round; best and median of the rounds; targets on the medians",
        "rows": table,
        "targets": found,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
