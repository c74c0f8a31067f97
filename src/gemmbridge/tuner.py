"""Tuning ahead of time: ``tune`` (a list of shapes) and ``tune_model`` (a torch model's linear layers).

Each GEMM runs once, on fresh random inputs on the current GPU, with exploration on
(``backends/cuda/explore.py``): its plan is tuned and the choice kept in the tuning cache
(``gemmbridge.tuning``), where later processes on the same GPU, driver and cuBLASLt find it. The
results are checked against float64 (a wrong one is dropped from the cache and raised). See docs/tuning.md.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import tuning
from .bench.data import DTYPES, DType, rel_err, torch_dtype
from .bench.presets import Shape, parse_shape
from .errors import BackendUnavailableError, OptionError, VendorError
from .plan import PLANS, cuda
from .progress import Progress
from .reference import TOLERANCE

_lock = threading.Lock()


@dataclass(frozen=True)
class TuneResult:
    """One tuned GEMM: the heuristic's first pick and the tuned choice, median ms per call in the same interleaved
    rounds on the same inputs, and the noise of their ratio (the choice replaces the first pick only when faster by
    more than the noise and 2 %: docs/tuning.md)."""

    problem: str
    first_ms: float
    tuned_ms: float
    chosen: str
    candidates: int
    noise: float = 0.0

    @property
    def speedup(self) -> float:
        return self.first_ms / self.tuned_ms


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("tuning needs PyTorch with CUDA (pip install torch) and an NVIDIA GPU") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("tuning needs an NVIDIA GPU, and torch sees none")
    return torch


def _dtype(dtype: str | DType) -> DType:
    if isinstance(dtype, DType):
        return dtype
    if dtype not in DTYPES:
        raise OptionError(f"tune: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextlib.contextmanager
def _exploring(budget_s: float) -> Iterator[list[tuple[TuneResult, Callable[[], None]]]]:
    """Every new GPU plan explored within ``budget_s`` seconds; yields the (result, forget) of each tuning."""
    if not tuning.enabled:
        raise OptionError("tune: the tuning cache is off (GEMMBRIDGE_TUNING_CACHE=0): nothing tuned would be kept")
    if not budget_s > 0:
        raise OptionError(f"tune: budget_s must be > 0, not {budget_s!r}")
    backend = cuda()
    found: list[tuple[TuneResult, Callable[[], None]]] = []

    def told(described: str, tuned: Any, forget: Callable[[], None]) -> None:
        result = TuneResult(described, tuned.first_ms, tuned.chosen_ms, tuned.chosen.name, len(tuned.timings),
                            tuned.noise)  # fmt: skip
        found.append((result, forget))

    with _lock:
        saved = backend.autotune.exploring, backend.explore.budget_s, backend.autotune.on_tuned
        backend.autotune.exploring, backend.explore.budget_s, backend.autotune.on_tuned = True, budget_s, told
        PLANS.clear()
        try:
            yield found
        finally:
            backend.autotune.exploring, backend.explore.budget_s, backend.autotune.on_tuned = saved
            PLANS.clear()  # later calls make their plans again, from the cache


def _checked(found: list, start: int, what: str, errors: dict[str, float], tolerance: float) -> list[TuneResult]:
    """The results tuned since ``start``; when a checked output is wrong, their entries are forgotten and raised."""
    bad = {name: err for name, err in errors.items() if not err < tolerance}
    if bad:
        for _, forget in found[start:]:
            forget()
        detail = ", ".join(f"{name} rel err {err:.1e}" for name, err in bad.items())
        raise VendorError(f"tune: {what} — the tuned choices give {detail} (tolerance {tolerance:.0e}): not kept")
    return [result for result, _ in found[start:]]


def tune(
    shapes: Iterable[str | Shape | tuple[int, ...]], *, dtype: str | DType = "bf16", transpose_a: bool = False,
    transpose_b: bool = False, budget_s: float = 4.0, progress: bool = False,
) -> list[TuneResult]:  # fmt: skip
    """Tune ``matmul(a, b, transpose_a=, transpose_b=)`` for each shape ``MxNxK[xBATCH]`` and keep the choices.

    ``a`` is ``(batch, M, K)`` (stored ``(batch, K, M)`` when ``transpose_a``), ``b`` is ``(batch, K, N)``
    (``(batch, N, K)`` when ``transpose_b``); ``dtype`` one of bf16, fp16, tf32, fp32, fp64. Returns one
    ``TuneResult`` per tuned GEMM.
    """
    import gemmbridge as gb

    dt = _dtype(dtype)
    parsed = [s if isinstance(s, Shape) else parse_shape(s if isinstance(s, str) else "x".join(map(str, s)))
              for s in shapes]  # fmt: skip
    torch = _torch_cuda()
    tdt = torch_dtype(dt)
    results: list[TuneResult] = []
    with _exploring(budget_s) as found, Progress(len(parsed), progress, "tune") as bar:
        for shape in parsed:
            bar.step(f"{dt.label} {shape}")
            batch = () if shape.batch == 1 else (shape.batch,)
            a = torch.randn(*batch, *((shape.k, shape.m) if transpose_a else (shape.m, shape.k)), device="cuda",
                            dtype=tdt)  # fmt: skip
            b = torch.randn(*batch, *((shape.n, shape.k) if transpose_b else (shape.k, shape.n)), device="cuda",
                            dtype=tdt)  # fmt: skip
            start = len(found)
            out = gb.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, allow_tf32=dt.tf32)
            opa, opb = (a.mT if transpose_a else a).double(), (b.mT if transpose_b else b).double()
            err = rel_err(out, opa @ opb, "cuda")
            results += _checked(found, start, f"{dt.label} {shape}", {"result": err}, dt.tolerance)
            bar.advance()
    return results


def _layers(model: Any, dtype: Any) -> list[tuple]:
    """The distinct linear layers and MLP blocks of ``model``: (kind, sizes, bias, activation, dtype)."""
    from torch import nn

    from .torch import MLP

    specs: dict[tuple, None] = {}
    sizes: tuple[int, ...]
    inside_mlp = {id(m.fc1) for m in model.modules() if isinstance(m, MLP)}
    inside_mlp |= {id(m.fc2) for m in model.modules() if isinstance(m, MLP)}
    for m in model.modules():
        if isinstance(m, MLP):
            sizes = (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features)
            specs["mlp", sizes, m.fc1.bias is not None, m.activation, dtype or m.fc1.weight.dtype] = None
        elif isinstance(m, nn.Linear) and id(m) not in inside_mlp:
            sizes = (m.in_features, m.out_features)
            specs["linear", sizes, m.bias is not None, getattr(m, "activation", "none"), dtype or m.weight.dtype] = None
    return list(specs)


def _run_layer(torch: Any, spec: tuple, tokens: int) -> dict[str, float]:
    """Forward and backward of one layer through gemmbridge on fresh inputs; each output's error against float64."""
    from .torch import functional

    kind, sizes, has_bias, activation, dtype = spec
    act64: dict[str, Callable] = {
        "none": lambda t: t,
        "relu": torch.relu,
        "gelu": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    }

    def param(*shape: int) -> Any:
        return (torch.randn(*shape, device="cuda") / shape[-1] ** 0.5).to(dtype).requires_grad_()

    x = torch.randn(tokens, sizes[0], device="cuda", dtype=dtype, requires_grad=True)
    if kind == "linear":
        params = [param(sizes[1], sizes[0]), param(sizes[1]) if has_bias else None]
        y = functional.linear(x, params[0], params[1], activation)
    else:
        params = [param(sizes[1], sizes[0]), param(sizes[1]) if has_bias else None, param(sizes[2], sizes[1]),
                  param(sizes[2]) if has_bias else None]  # fmt: skip
        y = functional.mlp(x, params[0], params[1], params[2], params[3], activation)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [x, *params]
    copies = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    if kind == "linear":
        ref = act64[activation](torch.nn.functional.linear(copies[0], copies[1], copies[2]))
    else:
        hidden = act64[activation](torch.nn.functional.linear(copies[0], copies[1], copies[2]))
        ref = torch.nn.functional.linear(hidden, copies[3], copies[4])
    ref.backward(dy.double())
    errors = {"y": rel_err(y, ref.detach(), "cuda")}
    for name, got, want in zip(("dx", "dw1", "db1", "dw2", "db2"), leaves, copies):
        if got is not None and want is not None:
            errors[name] = rel_err(got.grad, want.grad, "cuda")
    return errors


@contextlib.contextmanager
def _tf32(torch: Any, dtype: DType | None) -> Iterator[None]:
    """torch's TF32 setting for float32 matmuls as ``dtype`` says (tf32: on, fp32: off; other dtypes and None: as it
    is), restored afterwards (``gemmbridge.arrays.torch.tf32_setting``)."""
    if dtype is None or dtype.name != "float32":
        yield
        return
    from .arrays.torch import tf32_setting

    with tf32_setting(dtype.tf32):
        yield


def tune_model(
    model: Any, *, tokens: int, dtype: str | DType | None = None, budget_s: float = 4.0, progress: bool = False
) -> list[TuneResult]:
    """Tune the GEMMs that training ``model``'s ``nn.Linear`` layers and ``gemmbridge.torch.MLP`` blocks runs through
    ``gemmbridge.torch`` (``Linear``, ``convert_linears``, ``MLP``): for a batch of ``tokens`` rows, the forward
    ``x·Wᵀ`` (with its bias and activation), the input gradient ``dy·W`` and the weight gradient ``dyᵀ·x`` (with the
    bias gradient). ``dtype``: the layers' own parameter dtype when None (float32 layers then follow torch's TF32
    flag, as they will in training); ``tf32`` / ``fp32`` set that flag for the tuning. Returns one ``TuneResult``
    per GEMM."""
    if not isinstance(tokens, int) or tokens < 1:
        raise OptionError(f"tune_model: tokens must be a positive int, not {tokens!r}")
    torch = _torch_cuda()
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"tune_model: model must be a torch.nn.Module, not {type(model).__name__}")
    dt = None if dtype is None else _dtype(dtype)
    specs = _layers(model, None if dt is None else torch_dtype(dt))
    if not specs:
        raise OptionError(f"tune_model: {type(model).__name__} has no nn.Linear layer")
    results: list[TuneResult] = []
    with _exploring(budget_s) as found, Progress(len(specs), progress, "tune") as bar, _tf32(torch, dt):
        for spec in specs:
            kind, sizes, has_bias, activation, layer_dtype = spec
            what = f"{kind} {'x'.join(map(str, sizes))} bias={has_bias} {activation} {layer_dtype} tokens={tokens}"
            bar.step(what)
            start = len(found)
            errors = _run_layer(torch, spec, tokens)
            name = str(layer_dtype).removeprefix("torch.")
            tolerance = TOLERANCE["tf32" if name == "float32" else name]
            results += _checked(found, start, what, errors, tolerance)
            bar.advance()
    return results
