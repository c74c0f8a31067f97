"""Host RSS over a soak: gemmbridge against the framework's own matmul on the very same calls.

``gemmbridge stress`` on CUDA sees host RSS grow while every call draws a new problem. This script tells
whose memory that is: it draws the stress mix's valid calls (same seed, same calls) and runs them either
through ``gemmbridge.matmul`` or through the framework's own ops (``torch.matmul`` / ``cupy.matmul``, then
alpha, beta·c, bias and the epilogue as separate ops), sampling host RSS the way the stress test does.
If the framework's own matmul grows host RSS by the same amount, the growth is state of the CUDA libraries
(kernels met for the first time), not gemmbridge's.

    python scripts/soak_rss_control.py --runner torch --framework torch --calls 30000 --json torch.json
    python scripts/soak_rss_control.py --runner gemmbridge --framework torch --calls 30000 --json gb.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from gemmbridge import matmul
from gemmbridge.reference import gelu
from gemmbridge.stress.draw import Drawer
from gemmbridge.stress.memory import sample
from gemmbridge.testing import Framework


def framework_matmul(xp: Any, name: str) -> Any:
    """The framework's own product with gemmbridge's keyword arguments."""

    def run(a: Any, b: Any, *, transpose_a: bool = False, transpose_b: bool = False, alpha: float = 1.0,
            beta: float = 1.0, c: Any = None, bias: Any = None, epilogue: str = "none",
            allow_tf32: bool | None = None, out: Any = None) -> Any:  # fmt: skip
        if name == "torch":  # CuPy takes TF32 from CUPY_TF32 alone: its calls here run plain fp32
            xp.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
        swap = (lambda x: x.mT) if name == "torch" else (lambda x: xp.swapaxes(x, -1, -2))
        result = xp.matmul(swap(a) if transpose_a else a, swap(b) if transpose_b else b)
        if alpha != 1.0:
            result = result * alpha
        if c is not None:
            result = result + beta * c
        if bias is not None:
            result = result + bias
        if epilogue == "relu":
            result = xp.maximum(result, xp.zeros_like(result)) if name == "cupy" else xp.relu(result)
        elif epilogue == "gelu":
            result = gelu(result, xp)
        if out is not None:
            out[...] = result
            return out
        return result

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", choices=("gemmbridge", "torch", "cupy"), required=True)
    parser.add_argument("--framework", choices=("torch", "cupy"), required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: torch only, a dry run")
    parser.add_argument("--calls", type=int, default=30000, help="valid calls after priming")
    parser.add_argument("--prime", type=int, default=5000, help="valid calls before the first sample")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-dim", type=int, default=300)
    parser.add_argument("--problems", type=int, help="a bounded set of problems (see gemmbridge stress --problems)")
    parser.add_argument("--no-epilogue", action="store_true", help="drop bias and epilogue from every call")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.runner not in ("gemmbridge", args.framework):
        parser.error("--runner is gemmbridge or the framework itself")

    fw = Framework(args.framework, args.device)
    run = matmul if args.runner == "gemmbridge" else framework_matmul(fw.xp, args.framework)
    drawer = Drawer(args.seed, [fw], args.max_dim, args.problems)
    if args.samples < 2:
        parser.error("--samples: at least 2 (after priming and at the end)")
    every = max(1, args.calls // (args.samples - 1))
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i in range(args.prime + args.calls + 1):
        end = i == args.prime + args.calls
        if end or (i >= args.prime and (i - args.prime) % every == 0):
            samples.append({"call": i, **sample(args.device, [args.framework])})
        if end:
            break
        call = drawer.valid(False)
        kwargs = call.kwargs
        if args.no_epilogue:
            kwargs = {key: value for key, value in kwargs.items() if key not in ("bias", "epilogue")}
        run(*call.args, **kwargs)
        del call
    growth = samples[-1]["host_rss"] - samples[0]["host_rss"]
    doc = {
        "runner": args.runner,
        "framework": args.framework,
        "seed": args.seed,
        "problems": args.problems,
        "no_epilogue": args.no_epilogue,
        "environment": {key: value for key, value in os.environ.items() if key.startswith(("CUBLAS", "CUDA_MODULE"))},
        "prime_calls": args.prime,
        "calls": args.calls,
        "seconds": round(time.perf_counter() - started, 1),
        "host_rss_growth_mib": round(growth / (1 << 20), 2),
        "host_rss_mib": [round(s["host_rss"] / (1 << 20), 1) for s in samples],
        "samples": samples,
    }
    setting = " ".join([*(f"{k}={v}" for k, v in doc["environment"].items()), "no epilogue" * args.no_epilogue])
    print(f"{args.runner} on {args.framework} arrays, seed {args.seed}, problems {args.problems or 'new'} {setting}: "
          f"host RSS {doc['host_rss_mib']} MiB, growth {doc['host_rss_growth_mib']:+.2f} MiB "
          f"over {args.calls} calls ({doc['seconds']} s)")  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
