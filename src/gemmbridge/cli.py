"""Command line: ``gemmbridge info | bench | stress | tune``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from typing import Any

from . import __version__
from .errors import GemmError, OptionError

BENCH_EPILOG = """\
Every candidate is checked against a float64 reference before it is timed; a wrong one is reported, not
timed. A candidate that cannot run is listed with the reason. Exit status 1 when gemmbridge itself is
wrong or fails on any shape; other candidates' failures are reported in the table and the JSON.

examples:
  gemmbridge bench                                     # cuda: bf16, the default presets (CPU: fp32)
  gemmbridge bench --dtype bf16,fp16 --json b.json --plot b.png
  gemmbridge bench --shape 4096x16x4096 --shape 64x64x64x32 --dtype fp32
  gemmbridge bench --device cpu --preset small
  gemmbridge bench --preset skinny --dtype bf16,fp16   # bandwidth-bound: % of copy bandwidth

Candidates are timed in interleaved rounds until each one's best two rounds agree within --max-spread; a cell
that never does is marked ~ (unstable) and left out of the geo-means. Ratios are to the row's baseline, the
framework's matmul (numpy.matmul on the CPU, torch.matmul where numpy has no BLAS for the dtype, and on CUDA); the
table names it and the geo-means are kept apart per baseline. Small shapes also get µs per call and, on CUDA, GPU
µs per op (calls replayed from a CUDA graph). In a terminal the table is drawn with rich; piped or redirected it
is plain text, one line per row.
"""

STRESS_EPILOG = """\
Exit status 1 on any wrong result, any valid call that raised, any failing call that did not raise a
GemmError (or wrote into out), framework-allocator growth after the warm-up, device memory or host RSS
growth over the tolerances, or a plan cache over its bound.

under compute-sanitizer (memcheck): the short mode, torch arrays, torch's caching allocator off (exit 9 on
a memcheck error, 1 on a stress failure):
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --report-api-errors no \\
      --error-exitcode 9 python -m gemmbridge.cli stress --short --device cuda --frameworks torch
soak:
  gemmbridge stress --iterations 100000 --json stress.json
"""


TUNE_EPILOG = """\
Each GEMM is tuned on the current GPU, exploring cuBLASLt's algorithms beyond its heuristic's picks, and
the choice is kept in the tuning cache ($GEMMBRIDGE_CACHE_DIR, else $XDG_CACHE_HOME/gemmbridge, else
~/.cache/gemmbridge), one file per GPU, driver and cuBLASLt version; later processes use it automatically
(GEMMBRIDGE_TUNING_CACHE=0 turns that off). Every tuned result is checked against float64 first.

examples:
  gemmbridge tune --shapes 4096x4096x4096,8192x8192x8192 --dtype bf16,fp16
  gemmbridge tune --shapes 2048x11008x4096 --transpose-b --budget 8
  gemmbridge tune --model mypkg.models:build_model --tokens 8192 --dtype bf16
"""


def _info(args: argparse.Namespace) -> int:
    from .bench.report import write_json
    from .info import report

    to_file = args.json not in (None, "-")
    if to_file:
        _writable("--json", args.json)
    result = report()
    if args.json == "-":
        print(json.dumps(result, indent=1))
    else:
        _print_info(result)
    if to_file:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0 if all(c.get("ok") is not False for c in result["checks"]) else 1


def _print_info(result: dict[str, Any]) -> None:
    print("gemmbridge " + result["versions"]["gemmbridge"])
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v and k != "gemmbridge"))
    missing = [k for k, v in result["versions"].items() if v is None]
    if missing:
        print("not installed: " + ", ".join(missing))
    cuda = result["cuda"]
    if cuda.get("cuda_driver") or cuda.get("cuda_runtime") or cuda.get("cublasLt"):
        names = {
            "cuda_driver": "driver",
            "cuda_runtime": "runtime",
            "cublasLt": "cuBLASLt",
            "torch_cuda": "torch built for",
        }
        print("cuda: " + ", ".join(f"{names[k]} {cuda[k] or 'unknown'}" for k in names if k in cuda))
    else:
        print(f"cuda: none ({cuda.get('cuda_note', 'no CUDA device')})")
    for check in result["checks"]:
        if check.get("ok") is None or "rel_err" not in check:
            print(f"  {check['backend']:5} {'skipped' if check.get('ok') is None else 'FAILED'}: {check['reason']}")
            continue
        status = "ok" if check["ok"] else "FAILED"
        print(
            f"  {check['backend']:5} {check['device']:28} {check['library']:32} "
            f"self-check fp32 matmul+bias+gelu rel err {check['rel_err']:.1e} {status}"
        )
    print("caches:")
    for cache in result["caches"]:
        state = "" if cache["exists"] is None else (" (exists)" if cache["exists"] else " (not created yet)")
        print(f"  {cache['name']:22} {cache['location']}{state}")


def _options(cls: Any, args: argparse.Namespace, **extra: Any) -> Any:
    """``cls`` (an options dataclass) from the parsed arguments named like its fields; the rest keep its defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in vars(args).items() if key in names}, **extra)


def _writable(flag: str, path: str) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OptionError(f"{flag} {path}: is a directory, not a file")
    if not os.path.isdir(folder):
        raise OptionError(f"{flag} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OptionError(f"{flag} {path}: the directory {folder} is not writable")


def _bench(args: argparse.Namespace) -> int:
    from .bench import report
    from .bench.runner import BenchOptions, run

    options = _options(BenchOptions, args)
    for flag in ("json", "plot"):
        if getattr(args, flag, None):
            _writable(f"--{flag}", getattr(args, flag))
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise OptionError("--plot needs matplotlib: pip install matplotlib (or the [bench] extra)") from None
    doc = run(options)
    report.render(doc)
    if getattr(args, "json", None):
        report.write_json(doc, args.json)
        print(f"wrote {args.json}")
    if getattr(args, "plot", None):
        from .bench.plot import plot

        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 1 if doc["summary"]["gemmbridge"]["failures"] else 0


def _stress(args: argparse.Namespace) -> int:
    from .stress import StressOptions, run

    if getattr(args, "json_path", None):
        _writable("--json", args.json_path)
    options = _options(StressOptions, args, log=lambda line: print(line, flush=True))
    return 0 if run(options)["ok"] else 1


def _load_model(spec: str) -> Any:
    """The torch module that ``module:callable`` returns (the current directory is importable, as with -m)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise OptionError(f"--model {spec!r} is not module:callable (e.g. mypkg.models:build_model)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:
        raise OptionError(f"--model {spec!r}: cannot import {module_name} ({type(error).__name__}: {error})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise OptionError(f"--model {spec!r}: {module_name} has no {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise OptionError(f"--model {spec!r}: {attr} is not callable")
    model = target()
    import torch

    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _tune(args: argparse.Namespace) -> int:
    from . import tuner, tuning
    from .bench.data import parse_dtypes
    from .bench.presets import parse_shape

    if bool(args.shapes) == bool(args.model):
        raise OptionError("give --shapes MxNxK[,...] or --model module:callable (one of them)")
    if args.model and args.tokens is None:
        raise OptionError("--model needs --tokens T (the rows of the activations: batch × sequence length)")
    if args.shapes and args.tokens is not None:
        raise OptionError(f"--tokens {args.tokens} goes with --model; with --shapes, each shape's M is its rows")
    if args.model and (args.transpose_a or args.transpose_b):
        raise OptionError("--transpose-a / --transpose-b go with --shapes; a model's layers have their own layouts")
    if args.tokens is not None and args.tokens < 1:
        raise OptionError(f"--tokens {args.tokens}: a positive number of rows")
    if not args.budget > 0:
        raise OptionError(f"--budget {args.budget}: seconds per GEMM, > 0")
    shapes = [parse_shape(s, "--shapes") for s in ",".join(args.shapes or []).split(",") if s.strip()]
    dtypes = parse_dtypes(args.dtype) if args.dtype else None
    if args.json:
        _writable("--json", args.json)
    if not tuning.enabled:
        raise OptionError("the tuning cache is off (GEMMBRIDGE_TUNING_CACHE=0): nothing tuned would be kept")
    model = _load_model(args.model) if args.model else None
    tuner._torch_cuda()
    results: list[tuner.TuneResult] = []
    common = {"budget_s": args.budget, "progress": args.progress}
    chosen: list[Any] = dtypes or ([None] if model is not None else parse_dtypes("bf16"))  # None: the model's own
    for dtype in chosen:
        if model is not None:
            results += tuner.tune_model(model, tokens=args.tokens, dtype=dtype, **common)
        else:
            results += tuner.tune(shapes, dtype=dtype, transpose_a=args.transpose_a, transpose_b=args.transpose_b,
                                  **common)  # fmt: skip
    width = max([len(r.problem) for r in results] + [7])
    print(f"{'problem':{width}}  {'first pick':>10}  {'tuned':>10}  {'speedup':>7}  choice")
    for r in results:
        print(f"{r.problem:{width}}  {r.first_ms:7.4f} ms  {r.tuned_ms:7.4f} ms  {r.speedup:6.3f}×  {r.chosen}")
    print(f"kept in {tuning.cache_dir()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cache_dir": tuning.cache_dir(), "results": [
                {**dataclasses.asdict(r), "speedup": r.speedup} for r in results]}, f, indent=1)  # fmt: skip
        print(f"wrote {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmbridge", description="Vendor GEMM for any framework's tensors.")
    parser.add_argument("--version", action="version", version=f"gemmbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends, devices, versions, caches, and a self-check matmul per backend")
    info.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="write the report as JSON to PATH (alone or '-': print it)"
    )
    info.set_defaults(run=_info)

    raw = argparse.RawDescriptionHelpFormatter
    bench = sub.add_parser(
        "bench",
        help="gemmbridge vs the framework's matmul, a Triton kernel, CuPy and nvmath-python: TFLOP/s, %% of roofline",
        description="Time gemmbridge against the framework's own matmul (torch.matmul; numpy.matmul on the CPU), "
        "the project's Triton GEMM, cupy.matmul and nvmath-python, all in one run on the same inputs.",
        epilog=BENCH_EPILOG,
        formatter_class=raw,
        argument_default=argparse.SUPPRESS,  # absent options keep the options dataclass's defaults
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when torch sees a GPU, else cpu")
    bench.add_argument(
        "--dtype", dest="dtypes", help="comma list of bf16, fp16, tf32, fp32, fp64 (default: bf16 on cuda, fp32 on cpu)"
    )
    bench.add_argument(
        "--preset",
        dest="presets",
        help="comma list of square, llm, lora, small, skinny, all (default: square,llm,lora,small, or none with "
        "--shape); skinny: LoRA's GEMMs in a layer's layouts and decode steps, %% of copy bandwidth against the "
        "80 %% target",
    )
    bench.add_argument(
        "--shape", dest="shapes", action="append", metavar="MxNxK[xBATCH]", help="a shape to time (repeatable)"
    )
    bench.add_argument("--candidates", help="comma list of candidates to run (the others are listed as not selected)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument(
        "--plot", metavar="PATH", help="write a PNG (needs matplotlib): a roofline chart per dtype, every candidate"
    )
    bench.add_argument("--rep-ms", type=float, help="timed milliseconds per measurement (default 60 cuda, 25 cpu)")
    bench.add_argument("--rounds", type=int, help="interleaved rounds at least; each candidate keeps its best (2)")
    bench.add_argument(
        "--max-rounds", type=int, help="rounds in all, at most, for a candidate whose best two still differ (6)"
    )
    bench.add_argument(
        "--max-spread",
        type=float,
        metavar="PCT",
        help="a cell is stable when its best two rounds differ by at most PCT %% (5); unstable ones are marked ~ "
        "and left out of the geo-means",
    )
    bench.add_argument("--peak-size", type=int, help="M=N=K of the GEMM that measures the peak (8192 cuda, 1024 cpu)")
    bench.add_argument("--seed", type=int, help="seed of the random inputs (0)")
    bench.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    bench.set_defaults(run=_bench)

    stress = sub.add_parser(
        "stress",
        help="leak / soak test: a random mix of calls and failing calls; memory growth and results checked",
        description="Run a seeded random mix of gemmbridge calls (shapes, dtypes, transposes, batches, epilogues, "
        "out=, and failing calls) and check results on a sample, device memory, host RSS and the plan cache.",
        epilog=STRESS_EPILOG,
        formatter_class=raw,
        argument_default=argparse.SUPPRESS,  # absent options keep the options dataclass's defaults
    )
    stress.add_argument("--iterations", type=int, help="counted calls to make (default 1000; 200 with --short)")
    stress.add_argument("--seed", type=int, help="replay a run (default: a fresh seed, printed)")
    stress.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when torch sees a GPU, else cpu")
    stress.add_argument(
        "--frameworks", help="comma list of numpy, torch, cupy, jax (default: numpy,torch on cpu; torch,cupy on cuda)"
    )
    stress.add_argument("--max-dim", type=int, help="largest M, N, K (default 300; 64 with --short)")
    stress.add_argument(
        "--short", action="store_true", help="a small run for compute-sanitizer: 200 calls, dims ≤ 64, all checked"
    )
    stress.add_argument(
        "--prime-calls",
        type=int,
        help="random calls after the pass over the problem set, before the counted ones "
        "(default 5000 on cuda, 0 on cpu and with --short)",
    )
    stress.add_argument(
        "--problems",
        type=int,
        help="calls repeat a set of this many problems, with fresh data each call, as an application does (2000); "
        "each is made once before the counted calls. 0: a new problem every call (widest variety; per-shape caches "
        "then keep growing, so host RSS is reported, not judged)",
    )
    stress.add_argument("--check-every", type=int, help="check every Nth result after the first 50 (default 10)")
    stress.add_argument("--rss-tolerance-mb", type=float, help="host RSS growth allowed after warm-up (8)")
    stress.add_argument("--device-tolerance-mb", type=float, help="CUDA: cudaMemGetInfo growth allowed (64)")
    stress.add_argument(
        "--json", dest="json_path", metavar="PATH", help="write the log (counts, failures, memory samples) as JSON"
    )
    stress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    stress.set_defaults(run=_stress)

    tune = sub.add_parser(
        "tune",
        help="tune GEMMs ahead of time (shapes, or a torch model's linear layers) into the tuning cache",
        description="Tune the GEMMs of a list of shapes, or the forward and backward GEMMs of a torch model's "
        "nn.Linear layers, on the current GPU; keep the choices in the tuning cache; print first pick vs tuned.",
        epilog=TUNE_EPILOG,
        formatter_class=raw,
    )
    tune.add_argument("--shapes", action="append", metavar="MxNxK[,...]", help="comma list of shapes (repeatable)")
    tune.add_argument("--model", metavar="MODULE:CALLABLE", help="a callable returning a torch.nn.Module")
    tune.add_argument("--tokens", type=int, help="with --model: rows of the activations (batch × sequence)")
    tune.add_argument("--dtype", help="comma list of bf16, fp16, tf32, fp32, fp64 (default: bf16; a model's own)")
    tune.add_argument("--transpose-a", action="store_true", help="with --shapes: a is stored (K, M), read transposed")
    tune.add_argument("--transpose-b", action="store_true", help="with --shapes: b is stored (N, K), as nn.Linear's W")
    tune.add_argument("--budget", type=float, default=4.0, help="seconds of exploring per GEMM (default 4)")
    tune.add_argument("--json", metavar="PATH", help="write the results as JSON")
    tune.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    tune.set_defaults(run=_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except GemmError as error:  # a bad option or a missing backend: say it, no traceback
        print(f"gemmbridge {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
