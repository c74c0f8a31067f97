"""Host µs per small call for two checkouts of gemmbridge, timed alternately on one machine.

Host cost depends on the machine's CPU far more than on the library, so a change to the hot path is
judged only against the old code timed in the same run: each round starts one process per source tree
(``PYTHONPATH=<src>``), and each process times gemmbridge and torch on fp32 64³ (5000 calls without a
sync, then one sync; best of 5). Prints a JSON line per process and the medians over the rounds.

    python scripts/host_overhead_ab.py --label old=/tmp/old/src --label new=src --rounds 3 --json ab.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any


def per_call(fn: Callable[[], Any], calls: int = 5000) -> float:
    """Host µs per call: ``calls`` calls without a sync, then one sync; best of 5 after 300 warm-up calls."""
    import time

    import torch

    for _ in range(300):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


# run in a fresh process per source tree
TIMER = (
    "from __future__ import annotations\n"
    + inspect.getsource(per_call)
    + r"""
import json, torch, gemmbridge as gb
a, b = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
d = torch.empty(64, 64, device="cuda")
ref = a.double() @ b.double()
assert ((gb.matmul(a, b, allow_tf32=False).double() - ref).norm() / ref.norm()).item() < 1e-5
rows = {
    "gemmbridge": lambda: gb.matmul(a, b, allow_tf32=False),
    "torch": lambda: torch.matmul(a, b),
    "gemmbridge_out": lambda: gb.matmul(a, b, out=d, allow_tf32=False),
    "torch_out": lambda: torch.mm(a, b, out=d),
}
if hasattr(gb, "Plan"):  # trees from before plan objects have no such row
    plan = gb.Plan(a, b, out=d)
    rows["gemmbridge_plan_out"] = lambda: plan.run(a, b, out=d, allow_tf32=False)
print(json.dumps({"gemmbridge_file": gb.__file__, **{name: round(per_call(fn), 3) for name, fn in rows.items()}}))
"""
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", action="append", required=True, metavar="NAME=SRC", help="a source tree to time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write every sample and the medians")
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.label)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run([sys.executable, "-c", TIMER], env=env, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            where = row.pop("gemmbridge_file")
            if not os.path.realpath(where).startswith(os.path.realpath(src) + os.sep):
                sys.exit(f"{name}: gemmbridge was imported from {where}, not from {src}")
            samples[name].append(row)
            print(name, samples[name][-1], flush=True)
    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()
    }
    for name, row in medians.items():
        line = (f"{name:>8}: gemmbridge {row['gemmbridge']:.2f} µs vs torch {row['torch']:.2f} "
                f"({row['gemmbridge'] / row['torch']:.3f}×); with out= {row['gemmbridge_out']:.2f} vs "
                f"{row['torch_out']:.2f} ({row['gemmbridge_out'] / row['torch_out']:.3f}×)")  # fmt: skip
        if "gemmbridge_plan_out" in row:
            plan = row["gemmbridge_plan_out"]
            line += f"; Plan.run(out=) {plan:.2f} ({plan / row['torch_out']:.3f}×)"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trees": trees, "samples": samples, "medians": medians}, f, indent=1)


if __name__ == "__main__":
    main()
