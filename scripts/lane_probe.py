"""Host µs per call of the ways a training op can reach a GEMM, side by side in one process (CUDA).

The choices the torch layer's launch lane and its compiled path are made from (docs/architecture.md):
aten's own GEMM (``torch.mm``, ``F.linear``), gemmbridge's public ``matmul``, a resolved cuBLASLt plan
launched with pointers and a stream, the project's own kernel launched the same way, and a custom op
registered with ``torch.library.custom_op`` against one registered with ``torch.library.define`` +
``impl`` + ``register_fake``, in eager mode and inside ``torch.compile``. Shapes are small (T = 64,
d = 2048, r = 16, bf16) so that every row is host-bound. Prints one line per row; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from host_overhead_ab import per_call  # noqa: E402  (this folder: the timing loop every host script uses)

import gemmbridge as gb  # noqa: E402
from gemmbridge.arrays import BY_TYPE  # noqa: E402
from gemmbridge.backends.cuda import workspace  # noqa: E402
from gemmbridge.plan import PLANS  # noqa: E402
from gemmbridge.problem import Operands  # noqa: E402


def resolved(a: torch.Tensor, b: torch.Tensor, **options: Any) -> Callable[[], torch.Tensor]:
    """A call of the plan ``gb.matmul`` made for these operands, launched with pointers and a stream only."""
    PLANS.clear()
    gb.matmul(a, b, **options)
    gb.matmul(a, b, **options)
    plan = next(iter(PLANS.plans.values()))
    lt_plan, _graphs, launch = next(iter(plan.state.plans.values()))
    view = BY_TYPE[torch.Tensor]
    ctx = view.context(0, a)
    ws = workspace.pointer(view, ctx)[1]
    raw_stream = torch._C._cuda_getCurrentRawStream
    shape = plan.problem.out_shape
    new_empty = a.new_empty
    pa, pb = a.data_ptr(), b.data_ptr()

    def call() -> torch.Tensor:
        d = new_empty(shape)
        pd = d.data_ptr()
        launch(lt_plan, Operands(pa, pb, pd, pd, 0, 0, 0), 1.0, 0.0, ws, raw_stream(0))
        return d

    return call


def register_ops() -> None:
    """probe::mm_co (custom_op) and probe::mm_def (define + impl + register_fake), both ``a @ b``."""

    @torch.library.custom_op("probe::mm_co", mutates_args=())
    def mm_co(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, b)

    @mm_co.register_fake
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], b.shape[1]))

    torch.library.define("probe::mm_def", "(Tensor a, Tensor b) -> Tensor")

    @torch.library.impl("probe::mm_def", "CUDA")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, b)

    @torch.library.register_fake("probe::mm_def")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], b.shape[1]))


class DefLinear(torch.autograd.Function):
    """``x · Wᵀ`` through probe::mm_def forward and backward (autograd outside the op)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.ops.probe.mm_def(x, w.t())

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        return torch.ops.probe.mm_def(dy, w), torch.ops.probe.mm_def(dy.t(), x)


class AtenLoRA(torch.autograd.Function):
    """LoRA linear over aten: xa = x·Aᵀ; y = s·xa·Bᵀ; y += x·Wᵀ; backward g = dy·B, dB, dA, dx = s·g·A + dy·W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> Any:
        xa = torch.mm(x, a.t())
        y = torch.mm(xa, b.t()).mul_(s)
        y.addmm_(x, w.t())
        ctx.save_for_backward(x, w, a, b, xa)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        x, w, a, b, xa = ctx.saved_tensors
        s = ctx.s
        g = torch.mm(dy, b)
        db = torch.mm(dy.t(), xa).mul_(s)
        da = torch.mm(g.t(), x).mul_(s)
        dx = torch.mm(g, a).mul_(s)
        dx.addmm_(dy, w)
        return dx, None, da, db, None


def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        fn().sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    t, d, r = 64, 2048, 16
    x = torch.randn(t, d, device=dev, dtype=dt)
    w = torch.randn(d, d, device=dev, dtype=dt) / d**0.5
    wt = w.t()
    a = torch.randn(r, d, device=dev, dtype=dt) / d**0.5
    xg = x.clone().requires_grad_(True)
    rows: dict[str, float] = {}

    def row(name: str, fn: Callable[[], Any], calls: int = 3000) -> None:
        rows[name] = round(per_call(fn, calls), 2)
        print(f"{name:58} {rows[name]:8.2f} us", flush=True)

    row("torch.cuda current raw stream", lambda: torch._C._cuda_getCurrentRawStream(0))
    row("x.new_empty((64, 2048))", lambda: x.new_empty((t, d)))
    row("torch.mm(x, Wt) no grad", lambda: torch.mm(x, wt))
    row("F.linear(x, W) no grad", lambda: F.linear(x, w))
    row("F.linear(x, W), x requires grad", lambda: F.linear(xg, w))
    row("gb.matmul(x, W, transpose_b) no grad", lambda: gb.matmul(x, w, transpose_b=True))
    with torch.no_grad():
        row("resolved cuBLASLt plan: empty + pointers + launch", resolved(x, w, transpose_b=True))
        gb.set_kernels("on")
        row("resolved own kernel (x·Aᵀ, r=16): empty + launch", resolved(x, a, transpose_b=True))
        gb.set_kernels("auto")
        row("torch.mm(x, Aᵀ) no grad", lambda: torch.mm(x, a.t()))
    import gemmbridge.torch as gt

    register_ops()
    row("eager probe::mm_co (custom_op)", lambda: torch.ops.probe.mm_co(x, wt))
    row("eager probe::mm_def (define + impl)", lambda: torch.ops.probe.mm_def(x, wt))
    row("eager gt.linear, x requires grad (fwd)", lambda: gt.linear(xg, w))
    with torch.no_grad():
        for name, fn in {
            "F.linear": lambda x, w: F.linear(x, w),
            "probe::mm_co": lambda x, w: torch.ops.probe.mm_co(x, w.t()),
            "probe::mm_def": lambda x, w: torch.ops.probe.mm_def(x, w.t()),
            "gemmbridge.torch.linear": lambda x, w: gt.linear(x, w),
        }.items():
            compiled = torch.compile(fn, fullgraph=False)
            compiled(x, w)
            row(f"compiled inference: {name}", lambda c=compiled: c(x, w), 2000)
    for name, fn in {
        "F.linear": lambda x, w: F.linear(x, w),
        "DefLinear (define+impl, Function)": lambda x, w: DefLinear.apply(x, w),
        "gt.linear": lambda x, w: gt.linear(x, w),
    }.items():
        compiled = torch.compile(fn)
        wg = w.clone().requires_grad_(True)
        step(lambda c=compiled, wg=wg: c(xg, wg))()
        row(f"compiled fwd+bwd: {name}", step(lambda c=compiled, wg=wg: c(xg, wg)), 1000)
    # a LoRA layer's step at T = 64 (host-bound): frozen layer, aten Function, gemmbridge, PEFT-style composite
    b = (torch.randn(d, r, device=dev, dtype=dt) * 0.01).requires_grad_(True)
    ag = a.clone().requires_grad_(True)
    layer = gt.LoRALinear(d, d, r=r, alpha=2 * r, dtype=dt, device=dev, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    row("step: frozen F.linear", step(lambda: F.linear(xg, w)), 1000)
    row("step: aten autograd.Function LoRA", step(lambda: AtenLoRA.apply(xg, w, ag, b, 2.0)), 1000)
    row("step: gemmbridge LoRALinear", step(lambda: layer(xg)), 1000)
    row("step: PEFT-style composite", step(lambda: F.linear(xg, w) + F.linear(F.linear(xg, ag), b) * 2.0), 1000)
    out = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "shape": {"T": t, "d": d, "r": r, "dtype": "bfloat16"}, "host_us_per_call": rows}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
