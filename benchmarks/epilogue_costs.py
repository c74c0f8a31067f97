"""What each fused epilogue of the MLP block costs against the plain GEMM and torch's separate ops, on one card.

For the six GEMMs of an MLP step (bf16, T×d → T×h → T×d), times: the gemmbridge call as the MLP makes it
(fused epilogue), the same GEMM with no epilogue, torch's way (``torch.mm`` / ``addmm`` plus the separate
elementwise or reduction op), and the gemmbridge call with autotuning on. Decides which fusions pay.

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
            "gemmbridge": lambda: gb.matmul(x, w1, transpose_b=True, bias=b1, epilogue="gelu_aux"),
            "plain": lambda: gb.matmul(x, w1, transpose_b=True),
            "torch": lambda: F.gelu(torch.addmm(b1, x, w1.t()), approximate="tanh"),
        },
        "fc2 forward": {
            "gemmbridge": lambda: gb.matmul(hid, w2, transpose_b=True, bias=b2),
            "plain": lambda: gb.matmul(hid, w2, transpose_b=True),
            "torch": lambda: torch.addmm(b2, hid, w2.t()),
        },
        "fc2 weight grad + bias grad": {
            "gemmbridge": lambda: gb.matmul(dy, hid, transpose_a=True, epilogue="bgrad_a"),
            "plain": lambda: gb.matmul(dy, hid, transpose_a=True),
            "torch": lambda: (torch.mm(dy.t(), hid), dy.sum(0)),
        },
        "fc2 input grad + dgelu + fc1 bias grad": {
            "gemmbridge": lambda: gb.matmul(dy, w2, aux=aux, epilogue="dgelu_bgrad"),
            "plain": lambda: gb.matmul(dy, w2),
            "torch": lambda: (lambda g: (g, g.sum(0)))(
                torch.ops.aten.gelu_backward(torch.mm(dy, w2), pre, approximate="tanh")
            ),
        },
        "fc1 weight grad": {
            "gemmbridge": lambda: gb.matmul(dp, x, transpose_a=True),
            "plain": lambda: gb.matmul(dp, x, transpose_a=True),
            "torch": lambda: torch.mm(dp.t(), x),
        },
        "fc1 input grad": {
            "gemmbridge": lambda: gb.matmul(dp, w1),
            "plain": lambda: gb.matmul(dp, w1),
            "torch": lambda: torch.mm(dp, w1),
        },
    }
    rows = []
    for name, variants in gemms.items():
        row = {"gemm": name}
        for label, fn in variants.items():
            gb.set_autotune(False)
            gb.clear_cache()
            row[label] = ms(fn)
        gb.clear_cache()
        gb.set_autotune(True)
        row["gemmbridge autotuned"] = ms(variants["gemmbridge"])
        gb.set_autotune(False)
        rows.append(row)
        print(f"{name:40} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "gemm"), flush=True)
    totals = {k: sum(r[k] for r in rows) for k in rows[0] if k != "gemm"}
    print("total (ms)                               " + "  ".join(f"{k} {v:.3f}" for k, v in totals.items()))
    if args.json:
        doc = {"card": torch.cuda.get_device_name(0), "t": t, "d": d, "h": h, "rows": rows, "totals": totals}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
