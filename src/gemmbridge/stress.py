"""``gemmbridge stress``: the leak and soak test.

Runs N calls (default 1000; ``--iterations 100000`` for a soak) of a seeded random mix of problems: shapes
0..300 per dimension, 1-D operands, 0–2 broadcast batch dims, every dtype, transpose flags, transposed and
strided views, ``c``/``alpha``/``beta``/``bias``/``epilogue``, ``out=`` (sometimes ``out=c``), TF32 — with a
failing call (bad shapes, dtypes, aliasing, options, operand types) every fifth call, which must raise a
``gemmbridge.errors.GemmError`` and leave ``out`` untouched. Results are checked against a float64 numpy
reference on a sample (all of the first 50 calls, then every 10th).

The calls repeat a set of 2000 problems drawn from that mix (``--problems``; 2000 valid and 2000
failing ones), each with fresh data on every call, as an application repeats its shapes; 2000 is more
than the plan cache holds, so plans are evicted and rebuilt all through the run. ``--problems 0`` draws
a new problem for every call: the widest variety, but on CUDA host RSS then keeps growing with each
kernel the CUDA libraries meet for the first time (lazy module loading and the driver's per-kernel
state: measured on an H200, 30,000 new problems grew host RSS by 16 MiB under gemmbridge and 22 MiB
under ``torch.matmul`` with eager module loading —
``benchmarks/results/2026-11-26-h200-soak-rss-control.json``), which is not a leak of this library.

Memory is sampled after a warm-up (10 % of the calls) and at the end, each time after ``gc.collect()``,
``malloc_trim`` and emptying the frameworks' caching allocators. On CUDA, 5000 priming calls (drawn and
checked like the others; ``--prime-calls``) come first: host RSS grows by a few hundred MiB over the first
few thousand problems while CUDA loads kernels lazily and the libraries build their per-kernel state, and
that is not what this test looks for. It fails (exit status 1) when:

- the framework allocator's live bytes grew at all (torch ``memory_allocated``, CuPy pool ``used_bytes``);
- device memory in use (``cudaMemGetInfo``: total − free) grew by more than ``--device-tolerance-mb`` (64);
- host RSS grew by more than ``--rss-tolerance-mb`` (8);
- the plan cache ever held more than ``gemmbridge.ops.PLAN_CACHE_SIZE`` problems;
- any checked result is wrong, any valid call raised, or any failing call did not raise a GemmError.

The seed is printed; ``--seed`` replays the same sequence. JAX arrays are opt-in (``--frameworks``): JAX
compiles and caches an executable per new shape, so its runs grow host RSS through JAX's own caches (they
are cleared before each sample, which does not return all of it); give them a larger ``--rss-tolerance-mb``.

Under compute-sanitizer (memcheck), use the short mode with torch arrays and torch's caching allocator off,
so that each tensor is its own ``cudaMalloc`` and an out-of-bounds access is caught at the buffer's edge
(``--report-api-errors no``: cuda-bindings probes absent driver symbols, which memcheck would list)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --report-api-errors no \\
        --error-exitcode 9 python -m gemmbridge.cli stress --short --device cuda --frameworks torch

``--short`` is 200 calls of dims up to 64, every result checked, no priming (a few minutes under memcheck);
on CUDA its host RSS growth is reported, not judged (too few calls for the CUDA libraries' own state to
settle). Any memcheck error makes compute-sanitizer exit 9; the stress test's own failures exit 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import errors
from .info import torch_sees_cuda
from .ops import PLAN_CACHE_SIZE, cache_size, matmul
from .reference import GELU_TOLERANCE, TOLERANCE, reference

DTYPES = ("float32", "float64", "float16", "bfloat16")
ACCUMULATION_EPS = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "tf32": 2.0**-11,
    "float16": 2.0**-24,
    "bfloat16": 2.0**-24,
}
SCALARS = (1.0, -1.0, 0.5, 2.0, -0.75, 0.25, 1.5)  # exact in every dtype, so the reference uses the same values
EPILOGUES = ("none", "none", "relu", "gelu")
MAX_FAILURES_KEPT = 20
CHECK_FIRST = 50  # calls all checked against float64 before checking every --check-every'th
WARMUP_FRACTION = 0.1  # of the counted calls, before the first memory sample
# Host RSS on CUDA grows by a few hundred MiB over the first few thousand distinct problems — CUDA's lazy
# kernel loading and the libraries' own per-kernel state (measured on an H200: growth in steps up to about
# 4000 calls, then flat; the same with CUDA_MODULE_LOADING=EAGER minus the module part, and with gemmbridge's
# graph replay off), so the measured run starts after this many calls.
PRIME_CALLS_CUDA = 5000


@dataclass
class StressOptions:
    iterations: int | None = None  # default 1000 (200 with short)
    seed: int | None = None  # None: drawn and printed
    device: str | None = None  # "cpu" or "cuda"; None: cuda when torch sees one
    frameworks: str | None = None  # comma list of numpy, torch, cupy, jax
    max_dim: int | None = None  # default 300 (64 with short)
    short: bool = False
    check_every: int | None = None  # default 10 (1 with short)
    prime_calls: int | None = None  # calls before the counted ones; default 5000 on cuda (0 with short), 0 on cpu
    problems: int = 2000  # every call is one of this many fixed problems, with fresh data; 0: a new problem each call
    rss_tolerance_mb: float = 8.0
    device_tolerance_mb: float = 64.0
    json_path: str | None = None
    progress: bool = True
    log: Callable[[str], None] = field(default=print)


# -- frameworks ---------------------------------------------------------------------------------------------


class Framework:
    """Arrays of one framework on one device, as the stress test makes and reads them."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device = name, device
        self.mutable = name != "jax"
        self.dtypes = tuple(d for d in DTYPES if not (name == "cupy" and d == "bfloat16"))
        if name == "torch":
            import torch

            self.xp: Any = torch
        elif name == "cupy":
            import cupy

            self.xp = cupy
        elif name == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)  # float64 stays float64
            self.xp = jax.numpy
            self.jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        else:
            self.xp = np

    def __str__(self) -> str:
        return f"{self.name}-{self.device}"

    def make(self, arr: np.ndarray, dtype: str) -> Any:
        """A contiguous array of ``dtype`` (rounded from ``arr``) on this framework's device."""
        if dtype == "bfloat16":
            import ml_dtypes

            host = arr.astype(ml_dtypes.bfloat16, order="C")
        else:
            host = arr.astype(dtype, order="C")  # a fresh C-contiguous copy, 0-d stays 0-d
        if self.name == "numpy":
            return host
        if self.name == "torch":
            from .arrays.torch import tensor_from_numpy

            return tensor_from_numpy(host).to(self.device)
        if self.name == "cupy":
            return self.xp.asarray(host)
        import jax

        return jax.device_put(host, self.jax_device)

    def to64(self, x: Any) -> np.ndarray:
        """A float64 numpy copy (never a view: out=c overwrites c after its copy is taken)."""
        if self.name == "torch":
            return x.detach().cpu().double().numpy().copy()
        if self.name == "cupy":
            return self.xp.asnumpy(x).astype(np.float64)
        return np.asarray(x).astype(np.float64)

    def mT(self, x: Any) -> Any:
        return x.transpose(-1, -2) if self.name == "torch" else self.xp.swapaxes(x, -1, -2)

    def snapshot(self, x: Any) -> bytes:
        if self.name == "torch":
            return x.detach().cpu().contiguous().reshape(-1).view(self.xp.uint8).numpy().tobytes()
        if self.name == "cupy":
            return self.xp.asnumpy(x).tobytes()
        return np.asarray(x).tobytes()

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).removeprefix("torch.")

    def owns(self, x: Any) -> bool:
        kinds: dict[str, Any] = {
            "numpy": np.ndarray,
            "torch": getattr(self.xp, "Tensor", None),
            "cupy": getattr(self.xp, "ndarray", None),
        }
        if self.name == "jax":
            import jax

            return isinstance(x, jax.Array)
        return isinstance(x, kinds[self.name])


def default_frameworks(device: str) -> list[str]:
    candidates = ["numpy", "torch"] if device == "cpu" else ["torch", "cupy"]
    found = []
    for name in candidates:
        try:
            if name == "torch":
                import torch  # noqa: F401
            elif name == "cupy":
                import cupy

                if cupy.cuda.runtime.getDeviceCount() == 0:
                    continue
        except Exception:
            continue
        found.append(name)
    return found


# -- problems -----------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One drawn call: what to pass, what it is, and what must happen."""

    text: str
    fw: Framework
    args: tuple
    kwargs: dict
    dtype: str = "float32"
    expect: type[Exception] | None = None  # the GemmError subclass a failing call must raise
    inputs64: dict[str, Any] = field(default_factory=dict)  # float64 copies for the reference (checked calls)
    k: int = 0


class Drawer:
    """Draws calls from a seeded ``random.Random`` (decisions) and numpy Generator (data).

    With ``problems``, each call's decisions (framework, dtype, shapes, views, options, failure kind) come
    from one of that many fixed seeds, picked at random: the calls repeat a bounded set of problems (that
    many valid ones and that many failing ones), as a training loop does, while the data is fresh on every
    call.
    """

    def __init__(self, seed: int, frameworks: list[Framework], max_dim: int, problems: int | None = None) -> None:
        self.rnd = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.frameworks, self.max_dim = frameworks, max_dim
        if problems is not None and problems < 0:
            raise ValueError(f"Drawer: problems={problems}: None or 0 (a new problem each call) or more")
        self.structures = [self.rnd.randrange(1 << 62) for _ in range(problems or 0)]

    @contextlib.contextmanager
    def _structure(self) -> Iterator[None]:
        """Decisions from one of the fixed seeds (bounded set), else from the running sequence."""
        if not self.structures:
            yield
            return
        running = self.rnd
        self.rnd = random.Random(running.choice(self.structures))
        try:
            yield
        finally:
            self.rnd = running

    def dim(self) -> int:
        roll = self.rnd.random()
        if roll < 0.03:
            return 0
        if roll < 0.10:
            return 1
        if roll < 0.40:
            return self.rnd.randint(2, 16)
        return self.rnd.randint(2, max(2, self.max_dim))

    def data(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        if dtype == "float64":
            return self.rng.standard_normal(shape)
        return self.rng.standard_normal(shape, dtype=np.float32)

    def poisoned_out(self, fw: Framework, shape: tuple[int, ...], dtype: str) -> Any:
        """A NaN-filled out= (unwritten elements show): contiguous, a transposed view (written through a
        temporary), or a row-strided slice of a larger buffer (written in place with its leading dim)."""
        layout = self.rnd.choice(("contiguous", "contiguous", "transposed", "strided")) if len(shape) >= 2 else ""
        if layout == "transposed":
            return fw.mT(fw.make(np.full(shape[:-2] + (shape[-1], shape[-2]), np.nan), dtype))
        if layout == "strided":
            return fw.make(np.full(shape[:-2] + (2 * shape[-2], shape[-1]), np.nan), dtype)[..., ::2, :]
        return fw.make(np.full(shape, np.nan), dtype)

    def operand(self, fw: Framework, shape: tuple[int, ...], dtype: str, layout: str | None = None) -> Any:
        """A random array of logical ``shape``: contiguous, a transposed view, or a row-strided view."""
        views = len(shape) >= 2 and fw.name != "jax"  # JAX arrays have no strides to vary
        if not views:
            layout = "contiguous"
        elif layout is None:
            layout = self.rnd.choice(("contiguous", "contiguous", "transposed", "strided"))
        if layout == "transposed":
            return fw.mT(fw.make(np.swapaxes(self.data(shape, dtype), -1, -2), dtype))
        if layout == "strided":
            parent = fw.make(self.data(shape[:-2] + (2 * shape[-2], shape[-1]), dtype), dtype)
            return parent[..., ::2, :]
        return fw.make(self.data(shape, dtype), dtype)

    def batches(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        dims = tuple(self.rnd.randint(1, 3) for _ in range(self.rnd.choice((0, 0, 1, 2))))
        a = tuple(d if self.rnd.random() < 0.8 else 1 for d in dims)
        b = tuple(d if self.rnd.random() < 0.8 else 1 for d in dims)
        if dims and self.rnd.random() < 0.25:
            b = b[1:]  # fewer batch dims: broadcast
        return a, b

    def valid(self, checked: bool) -> Call:
        with self._structure():
            return self._valid(checked)

    def _valid(self, checked: bool) -> Call:
        fw = self.rnd.choice(self.frameworks)
        dtype = self.rnd.choice(fw.dtypes)
        m, n, k = self.dim(), self.dim(), self.dim()
        vec_a, vec_b = self.rnd.random() < 0.05, self.rnd.random() < 0.05
        a_batch, b_batch = self.batches()
        ta = not vec_a and self.rnd.random() < 0.3
        tb = not vec_b and self.rnd.random() < 0.3
        a_shape = (k,) if vec_a else a_batch + ((k, m) if ta else (m, k))
        b_shape = (k,) if vec_b else b_batch + ((n, k) if tb else (k, n))
        a, b = self.operand(fw, a_shape, dtype), self.operand(fw, b_shape, dtype)
        kwargs: dict[str, Any] = {}
        if ta:
            kwargs["transpose_a"] = True
        if tb:
            kwargs["transpose_b"] = True
        batch = np.broadcast_shapes(a_batch if not vec_a else (), b_batch if not vec_b else ())
        out_shape = batch + (() if vec_a else (m,)) + (() if vec_b else (n,))
        matrices = not (vec_a or vec_b)
        if matrices and self.rnd.random() < 0.3:
            c_shape = out_shape if self.rnd.random() < 0.7 else out_shape[-2:]
            kwargs["c"] = self.operand(fw, c_shape, dtype)
            kwargs["beta"] = self.rnd.choice(SCALARS)
        if self.rnd.random() < 0.3:
            kwargs["alpha"] = self.rnd.choice(SCALARS)
        if matrices and self.rnd.random() < 0.3:
            kwargs["bias"] = fw.make(self.data((n,), dtype), dtype)
        if matrices:
            kwargs["epilogue"] = self.rnd.choice(EPILOGUES)
        tf32 = dtype == "float32" and self.rnd.random() < 0.2
        if tf32:
            kwargs["allow_tf32"] = True
        elif dtype == "float32" and fw.name == "jax":
            kwargs["allow_tf32"] = False  # JAX's default precision may be TF32 on a GPU; the others default to off
        inputs64 = {}
        if checked:  # before the call: out=c overwrites c
            inputs64 = {"a": fw.to64(a), "b": fw.to64(b)}
            inputs64.update({name: fw.to64(kwargs[name]) for name in ("c", "bias") if name in kwargs})
        if fw.mutable and self.rnd.random() < 0.25:
            c = kwargs.get("c")
            if c is not None and tuple(c.shape) == out_shape and self.rnd.random() < 0.5:
                kwargs["out"] = c  # accumulate in place
            else:
                kwargs["out"] = self.poisoned_out(fw, out_shape, dtype)
        text = f"{fw} {'tf32' if tf32 else dtype} a{tuple(a.shape)} b{tuple(b.shape)} " + " ".join(
            f"{key}={_short(value)}" for key, value in kwargs.items()
        )
        return Call(text, fw, (a, b), kwargs, "tf32" if tf32 else dtype, None, inputs64, k)

    def largest(self, fw: Framework, dtype: str) -> Call:
        """The largest call the mix can draw (every dim at its maximum, 3×3 batch, strided c and out=),
        checked: run first, so that every pool sized by the largest problem is at its size before the
        warm-up sample (the allocators' and the driver's staging buffers keep their high-water mark)."""
        shape = (3, 3, self.max_dim, self.max_dim)
        a, b, c = (self.operand(fw, shape, dtype, "strided") for _ in range(3))
        kwargs: dict[str, Any] = {"c": c, "beta": 0.5, "bias": fw.make(self.data(shape[-1:], dtype), dtype)}
        kwargs["epilogue"] = "gelu"
        inputs64 = {"a": fw.to64(a), "b": fw.to64(b), "c": fw.to64(c), "bias": fw.to64(kwargs["bias"])}
        if fw.mutable:
            kwargs["out"] = fw.make(np.full(shape, np.nan), dtype)
        text = f"{fw} {dtype} largest a{shape} b{shape} c, bias, gelu, out="
        return Call(text, fw, (a, b), kwargs, dtype, None, inputs64, self.max_dim)

    def failing(self) -> Call:
        """A call that must raise a GemmError (and write nothing into ``out``)."""
        with self._structure():
            return self._failing()

    def _failing(self) -> Call:
        fw = self.rnd.choice(self.frameworks)
        dtype = self.rnd.choice(fw.dtypes)
        m, n, k = (self.rnd.randint(1, 24) for _ in range(3))
        a = fw.make(self.data((m, k), dtype), dtype)
        b = fw.make(self.data((k, n), dtype), dtype)
        out = fw.make(np.full((m, n), np.nan), dtype) if fw.mutable and self.rnd.random() < 0.5 else None
        with_out = {} if out is None else {"out": out}
        kinds: list[tuple[str, tuple, dict, type[Exception]]] = [
            ("inner dims differ", (a, fw.make(self.data((k + 1, n), dtype), dtype)), with_out, errors.ShapeError),
            ("mixed dtypes", (a, fw.make(self.data((k, n), dtype), _other(dtype, fw))), with_out, errors.DTypeError),
            ("int32 operands", (fw.make(self.data((m, k), dtype), "int32"), fw.make(self.data((k, n), dtype), "int32")),
             {}, errors.DTypeError),
            ("unknown epilogue", (a, b), {"epilogue": "swish", **with_out}, errors.OptionError),
            ("bias of the wrong length", (a, b), {"bias": fw.make(self.data((n + 1,), dtype), dtype), **with_out},
             errors.ShapeError),
            ("c of the wrong shape", (a, b), {"c": fw.make(self.data((m, n + 1), dtype), dtype), **with_out},
             errors.ShapeError),
            ("transpose of a vector", (fw.make(self.data((k,), dtype), dtype), b), {"transpose_a": True, **with_out},
             errors.OptionError),
            ("not an array", (a, [[1.0] * n] * k), with_out, errors.OperandTypeError),
            ("operands of two frameworks", (a, _foreign(fw, self.data((k, n), dtype), dtype)), with_out,
             errors.OperandTypeError),
        ]  # fmt: skip
        if fw.mutable:
            out_bad = fw.make(np.full((m + 1, n), np.nan), dtype)
            kinds.append(("out of the wrong shape", (a, b), {"out": out_bad}, errors.ShapeError))
            square = fw.make(self.data((m, m), dtype), dtype)
            kinds.append(("out aliases a", (square, fw.make(self.data((m, m), dtype), dtype)), {"out": square},
                          errors.AliasError))  # fmt: skip
        text, args, kwargs, expect = self.rnd.choice(kinds)
        return Call(f"{fw} {dtype} failing: {text}", fw, args, kwargs, dtype, expect)


def _other(dtype: str, fw: Framework) -> str:
    return next(d for d in fw.dtypes if d != dtype)


def _foreign(fw: Framework, arr: np.ndarray, dtype: str) -> Any:
    """``arr`` in another framework than ``fw`` (numpy, or torch when ``fw`` is numpy)."""
    if fw.name != "numpy":
        return arr.astype(np.float32)
    try:
        import torch

        return torch.from_numpy(arr.astype(np.float32))
    except ImportError:
        return arr.tolist()


def _short(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}{tuple(shape)}" if shape is not None else repr(value)


# -- checks -------------------------------------------------------------------------------------------------


def check_result(call: Call, result: Any) -> str | None:
    """None when ``result`` is right, else what is wrong.

    Right: the caller's type and dtype, the reference's shape, ``out`` itself when given, no NaN (the
    poison), and within tolerance: ‖err‖/‖ref‖ ≤ tol, or — where the reference cancels to near zero —
    every element within tol·|ref| + (K + 4)·4ε·(|α|·|a|@|b| + |β|·|c| + |bias|), ε the accumulation's.
    """
    fw, kwargs = call.fw, call.kwargs
    if not fw.owns(result):
        return f"returned a {type(result).__module__}.{type(result).__name__}, not the caller's type"
    if "out" in kwargs and result is not kwargs["out"]:
        return "returned something else than out"
    name = "float32" if call.dtype == "tf32" else call.dtype
    if fw.dtype_name(result) != name:
        return f"returned dtype {fw.dtype_name(result)}, not {name}"
    if not call.inputs64:
        return None
    inp = call.inputs64
    options = {key: kwargs[key] for key in ("transpose_a", "transpose_b", "alpha", "beta", "epilogue") if key in kwargs}
    ref = reference(inp["a"], inp["b"], c=inp.get("c"), bias=inp.get("bias"), **options)
    got = fw.to64(result)
    if got.shape != ref.shape:
        return f"shape {got.shape}, reference {ref.shape}"
    if not np.isfinite(got).all():
        return "NaN or inf in the result (out not fully written?)"
    diff = np.abs(got - ref)
    scale = float(np.linalg.norm(ref))
    tol = TOLERANCE[call.dtype]
    if options.get("epilogue") == "gelu":
        tol = GELU_TOLERANCE.get(call.dtype, tol)
    err = float(np.linalg.norm(diff)) / scale if scale else float(np.abs(got).max(initial=0.0))
    if err <= tol:
        return None
    bound = reference(np.abs(inp["a"]), np.abs(inp["b"]), c=None if "c" not in inp else np.abs(inp["c"]),
                      bias=None if "bias" not in inp else np.abs(inp["bias"]),
                      transpose_a=options.get("transpose_a", False), transpose_b=options.get("transpose_b", False),
                      alpha=abs(options.get("alpha", 1.0)), beta=abs(options.get("beta", 1.0)))  # fmt: skip
    eps = 4 * (call.k + 4) * ACCUMULATION_EPS[call.dtype]
    if np.all(diff <= tol * np.abs(ref) + eps * bound):
        return None
    return f"relative error {err:.3g} > {tol:g} (and not within the elementwise bound)"


def run_call(call: Call) -> str | None:
    """Make the call; None when it behaved, else what went wrong."""
    fw = call.fw
    if call.expect is not None:
        out = call.kwargs.get("out")
        before = fw.snapshot(out) if out is not None else None
        try:
            matmul(*call.args, **call.kwargs)
        except errors.GemmError as error:
            if not isinstance(error, call.expect):
                return f"raised {type(error).__name__} ({error}), expected {call.expect.__name__}"
        except Exception as error:
            return f"raised {type(error).__name__} ({error}), not a GemmError"
        else:
            return f"did not raise (expected {call.expect.__name__})"
        if out is not None and fw.snapshot(out) != before:
            return "a failed call wrote into out"
        return None
    try:
        result = matmul(*call.args, **call.kwargs)
    except Exception as error:
        return f"raised {type(error).__name__}: {error}"
    return check_result(call, result)


# -- memory -------------------------------------------------------------------------------------------------


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so that RSS shows live memory."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def host_rss() -> int:
    """Resident set size in bytes (/proc/self/statm; else the peak from ``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def sample(device: str, frameworks: list[str]) -> dict[str, int]:
    """Memory now, after collecting garbage and emptying the caching allocators."""
    if "jax" in frameworks:  # JAX's compiled-executable caches grow with every new shape; they are not ours
        import jax

        jax.clear_caches()
    gc.collect()
    _malloc_trim()
    found = {"host_rss": host_rss(), "plan_cache": cache_size()}
    if device != "cuda":
        return found
    if "cupy" in frameworks:
        import cupy

        cupy.cuda.Device().synchronize()
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        found["cupy_used"] = int(pool.used_bytes())
        free, total = cupy.cuda.runtime.memGetInfo()
        found["device_used"] = int(total - free)
    with contextlib.suppress(ImportError):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if "torch" in frameworks:
            found["torch_allocated"] = int(torch.cuda.memory_allocated())
        free, total = torch.cuda.mem_get_info()  # after torch's cache is emptied
        found["device_used"] = int(total - free)
    return found


def tolerances(options: StressOptions, device: str, prime: int) -> dict[str, int | None]:
    """Allowed growth after the warm-up, in bytes; None: reported, not judged (host RSS of a short CUDA run,
    whose calls are too few for the CUDA libraries' own state to settle)."""
    mib = 1 << 20
    rss = int(options.rss_tolerance_mb * mib) if device == "cpu" or prime >= PRIME_CALLS_CUDA // 2 else None
    return {
        "torch_allocated": 0,
        "cupy_used": 0,
        "device_used": int(options.device_tolerance_mb * mib),
        "host_rss": rss,
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):+.2f} MiB" if abs(n) >= 1 << 16 else f"{n:+d} B"


# -- the run ------------------------------------------------------------------------------------------------


def _prime_calls(options: StressOptions, device: str) -> int:
    if options.prime_calls is not None:
        return max(0, options.prime_calls)
    return PRIME_CALLS_CUDA if device == "cuda" and not options.short else 0


def _resolve(options: StressOptions) -> tuple[str, list[str], int, int, int]:
    device = options.device or ("cuda" if torch_sees_cuda() else "cpu")
    if device not in ("cpu", "cuda"):
        raise errors.OptionError(f"stress: --device {device!r}: choose cpu or cuda")
    names = [n.strip() for n in options.frameworks.split(",")] if options.frameworks else default_frameworks(device)
    unknown = set(names) - {"numpy", "torch", "cupy", "jax"}
    if unknown or not names:
        raise errors.OptionError(f"stress: --frameworks {options.frameworks!r}: choose from numpy, torch, cupy, jax")
    if device == "cuda" and "numpy" in names:
        raise errors.OptionError("stress: numpy arrays live on the CPU; use --device cpu for them")
    if device == "cpu" and "cupy" in names:
        raise errors.OptionError("stress: cupy arrays live on the GPU; use --device cuda for them")
    iterations = options.iterations or (200 if options.short else 1000)
    if iterations < 1:
        raise errors.OptionError(f"stress: --iterations {iterations}: at least 1")
    max_dim = options.max_dim or (64 if options.short else 300)
    if options.problems < 0:
        raise errors.OptionError(f"stress: --problems {options.problems}: 0 (a new problem each call) or more")
    check_every = options.check_every or (1 if options.short else 10)
    return device, names, iterations, max_dim, check_every


def run(options: StressOptions) -> dict[str, Any]:
    """Run the stress test; the result's ``ok`` is False on any failure (see the module doc)."""
    device, names, iterations, max_dim, check_every = _resolve(options)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    log = options.log
    frameworks = [Framework(name, device) for name in names]
    prime = _prime_calls(options, device)
    limits = tolerances(options, device, prime)
    drawn = "a new problem each call"
    replay_set = "" if options.problems == StressOptions.problems else f" --problems {options.problems}"
    if options.problems:
        drawn = f"a set of {options.problems} problems (fresh data each call)"
    log(f"gemmbridge stress: {iterations} calls on {device} ({', '.join(names)}), {drawn}, dims up to {max_dim}, "
        f"seed {seed} (replay: --seed {seed}{replay_set})")  # fmt: skip
    rss = "not judged" if limits["host_rss"] is None else f"≤ {options.rss_tolerance_mb:g} MiB"
    log(f"tolerances after warm-up: framework allocator growth 0 B, device memory in use (cudaMemGetInfo) "
        f"growth ≤ {options.device_tolerance_mb:g} MiB, host RSS growth {rss}, "
        f"plan cache ≤ {PLAN_CACHE_SIZE}")  # fmt: skip
    log(f"results checked against float64: the first {CHECK_FIRST} calls, then every {check_every}th")
    drawer = Drawer(seed, frameworks, max_dim, options.problems or None)
    warmup = prime + min(max(1, int(iterations * WARMUP_FRACTION)), iterations - 1)
    every = max(1, iterations // 10)
    if prime:
        log(f"first {prime} priming calls (drawn and checked alike), so that the CUDA libraries' own per-kernel "
            f"state has settled before the warm-up sample")  # fmt: skip
    counts = {"largest": 0, "valid": 0, "checked": 0, "failing": 0}
    failures: list[dict[str, Any]] = []
    failure_count = 0
    samples: list[dict[str, Any]] = []
    max_cache = 0
    started = time.perf_counter()
    for fw in frameworks:  # the largest problems first: pools sized by them reach their size in the warm-up
        for dtype in fw.dtypes:
            call = drawer.largest(fw, dtype)
            counts["largest"] += 1
            problem = run_call(call)
            if problem:
                failure_count += 1
                failures.append({"iteration": -1, "call": call.text, "problem": problem})
            del call
    with _progress(prime + iterations, options.progress) as advance:
        for i in range(prime + iterations):
            if i == warmup or (i > warmup and (i - prime) % every == 0):
                samples.append({"iteration": i, **sample(device, names)})
            checked = i < CHECK_FIRST or i % check_every == 0
            call = drawer.failing() if i % 5 == 4 else drawer.valid(checked)
            counts["failing" if call.expect else "valid"] += 1
            counts["checked"] += bool(call.inputs64)
            problem = run_call(call)
            max_cache = max(max_cache, cache_size())
            if problem:
                failure_count += 1
                if len(failures) < MAX_FAILURES_KEPT:
                    failures.append({"iteration": i, "call": call.text, "problem": problem})
            del call
            advance()
    samples.append({"iteration": prime + iterations, **sample(device, names)})
    base = samples[0]  # after warm-up
    growth = {key: samples[-1][key] - base[key] for key in samples[-1] if key in limits}
    over = {key: value for key, value in growth.items() if (limit := limits[key]) is not None and value > limit}
    ok = not failure_count and not over and max_cache <= PLAN_CACHE_SIZE
    result = {
        "schema": "gemmbridge.stress/1",
        "ok": ok,
        "seed": seed,
        "device": device,
        "frameworks": names,
        "iterations": iterations,
        "prime_calls": prime,
        "max_dim": max_dim,
        "problems": options.problems,
        "warmup_iterations": warmup,
        "seconds": time.perf_counter() - started,
        "counts": counts,
        "failure_count": failure_count,
        "failures": failures,
        "tolerances": {**{k: v for k, v in limits.items() if k in growth}, "plan_cache": PLAN_CACHE_SIZE},
        "growth_after_warmup": growth,
        "over_tolerance": over,
        "plan_cache_max": max_cache,
        "samples": samples,
    }
    _summary(result, log)
    if options.json_path:
        with open(options.json_path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


def _summary(result: dict[str, Any], log: Callable[[str], None]) -> None:
    counts = result["counts"]
    log(f"calls: {counts['largest']} of the largest size first, then {counts['valid']} valid ({counts['checked']} "
        f"checked against float64) and {counts['failing']} failing (each must raise a GemmError), "
        f"{result['seconds']:.1f} s")  # fmt: skip
    first, last = result["samples"][0], result["samples"][-1]
    log(f"memory, call {first['iteration']} (after warm-up) → call {last['iteration']} (end):")
    for key, limit in result["tolerances"].items():
        if key == "plan_cache":
            state = "ok" if result["plan_cache_max"] <= limit else "OVER"
            log(f"  {'plan cache':16} {first['plan_cache']} → {last['plan_cache']}, at most {result['plan_cache_max']} "
                f"(bound {limit})  {state}")  # fmt: skip
            continue
        grew = result["growth_after_warmup"][key]
        state = "OVER" if key in result["over_tolerance"] else "ok"
        allowed = "not judged: too few calls on CUDA" if limit is None else f"tolerance {_mib(limit).lstrip('+')}"
        if limit is None:
            state = "-"
        log(f"  {key:16} {first[key] / (1 << 20):.2f} → {last[key] / (1 << 20):.2f} MiB ({_mib(grew)}, "
            f"{allowed})  {state}")  # fmt: skip
    for failure in result["failures"]:
        log(f"  FAILED at call {failure['iteration']}: {failure['call']}\n    {failure['problem']}")
    if result["failure_count"] > len(result["failures"]):
        log(f"  ... and {result['failure_count'] - len(result['failures'])} more failures")
    verdict = "PASS" if result["ok"] else f"FAIL ({result['failure_count']} failed calls, over tolerance: "
    verdict += "" if result["ok"] else f"{sorted(result['over_tolerance']) or 'none'})"
    log(f"stress {verdict} (seed {result['seed']})")


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr when rich is installed and stderr is a terminal."""
    bar: Any = None
    if enabled and sys.stderr.isatty():
        try:
            from rich.console import Console
            from rich.progress import Progress

            bar = Progress(console=Console(stderr=True), transient=True)
        except ImportError:
            pass
    if bar is None:
        yield lambda: None
        return
    with bar:
        task = bar.add_task("stress", total=total)
        yield lambda: bar.advance(task)
