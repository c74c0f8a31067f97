"""What each fused epilogue of the MLP block costs against the plain GEMM and torch's separate ops, on one card.

For the six GEMMs of an MLP step (bf16, T×d → T×h → T×d), times each way to get the same outputs: the fused
epilogue, the GEMM with the rest as separate torch ops, the plain GEMM alone (the floor), and torch's way
(``torch.mm`` / ``addmm`` plus the separate elementwise or reduction op). Interleaved rounds, best kept.
Decides which fusions pay on a card.

    python benchmarks/epilogue_costs.py --t 8192 --json costs.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import triton.testing
from torch.nn import functional as F

import gemmbridge as gb


def ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=int, default=8192)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--h", type=int, default=16384)
    parser.add_argument("--json")
    args = parser.parse_args()
    t, d, h = args.t, args.d, args.h
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w1, b1 = torch.randn(t, d, **bf), torch.randn(h, d, **bf) / 64, torch.randn(h, **bf)
    w2, b2, dy = torch.randn(d, h, **bf) / 128, torch.randn(d, **bf), torch.randn(t, d, **bf)
    hid, aux = gb.matmul(x, w1, transpose_b=True, bias=b1, epilogue="gelu_aux")
    pre = aux[:, :h]
    dp = torch.randn(t, h, **bf)
    gemms = {
        "fc1 forward": {
            "gemmbridge gelu_aux+bias": lambda: gb.matmul(x, w1, transpose_b=True, bias=b1, epilogue="gelu_aux"),
            "gemmbridge bias, then torch gelu": lambda: F.gelu(
                gb.matmul(x, w1, transpose_b=True, bias=b1), approximate="tanh"
            ),
            "plain GEMM": lambda: gb.matmul(x, w1, transpose_b=True),
            "torch addmm + gelu": lambda: F.gelu(torch.addmm(b1, x, w1.t()), approximate="tanh"),
        },
        "fc2 forward": {
            "gemmbridge bias": lambda: gb.matmul(hid, w2, transpose_b=True, bias=b2),
            "gemmbridge, then + bias": lambda: gb.matmul(hid, w2, transpose_b=True) + b2,
            "plain GEMM": lambda: gb.matmul(hid, w2, transpose_b=True),
            "torch addmm": lambda: torch.addmm(b2, hid, w2.t()),
        },
        "fc2 weight grad + bias grad": {
            "gemmbridge bgrad_a": lambda: gb.matmul(dy, hid, transpose_a=True, epilogue="bgrad_a"),
            "gemmbridge, then sum": lambda: (gb.matmul(dy, hid, transpose_a=True), dy.sum(0)),
            "plain GEMM": lambda: gb.matmul(dy, hid, transpose_a=True),
            "torch mm + sum": lambda: (torch.mm(dy.t(), hid), dy.sum(0)),
        },
        "fc2 input grad + dgelu + fc1 bias grad": {
            "gemmbridge dgelu_bgrad": lambda: gb.matmul(dy, w2, aux=aux, epilogue="dgelu_bgrad"),
            "gemmbridge dgelu, then sum": lambda: (lambda g: (g, g.sum(0)))(
                gb.matmul(dy, w2, aux=aux, epilogue="dgelu")
            ),
            "gemmbridge, then gelu_backward + sum": lambda: (lambda g: (g, g.sum(0)))(
                torch.ops.aten.gelu_backward(gb.matmul(dy, w2), pre, approximate="tanh")
            ),
            "plain GEMM": lambda: gb.matmul(dy, w2),
            "torch mm + gelu_backward + sum": lambda: (lambda g: (g, g.sum(0)))(
                torch.ops.aten.gelu_backward(torch.mm(dy, w2), pre, approximate="tanh")
            ),
        },
        "fc1 weight grad": {
            "gemmbridge": lambda: gb.matmul(dp, x, transpose_a=True),
            "torch mm": lambda: torch.mm(dp.t(), x),
        },
        "fc1 input grad": {"gemmbridge": lambda: gb.matmul(dp, w1), "torch mm": lambda: torch.mm(dp, w1)},
    }
    rows = []
    for name, variants in gemms.items():
        for fn in variants.values():
            fn()  # plans made before any timing
        best = {label: float("inf") for label in variants}
        for _ in range(3):  # interleaved rounds, best kept: the card's clock drifts over seconds
            for label, fn in variants.items():
                best[label] = min(best[label], ms(fn))
        rows.append({"gemm": name, **best})
        print(f"{name}:", flush=True)
        for label, value in best.items():
            print(f"    {label:40} {value:7.3f} ms", flush=True)
    if args.json:
        doc = {"card": torch.cuda.get_device_name(0), "t": t, "d": d, "h": h, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
