"""``matmul``: validate, describe (cached per problem), allocate in the caller's framework, run."""

from __future__ import annotations

import numbers
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from .arrays import BY_TYPE, ArrayAdapter, adapter_for
from .backends import cpu
from .errors import AliasError, BackendUnavailableError, OperandTypeError, OptionError
from .problem import Problem, describe, names

PLAN_CACHE_SIZE = 512
_local = threading.local()


class _Entry:
    """A described problem and, for CUDA, its vendor plans."""

    __slots__ = ("problem", "device", "plain", "plans", "overlaps", "used")

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.device = -1 if problem.device == "cpu" else int(problem.device.split(":")[1])
        self.plain = not (problem.empty or problem.k == 0 or problem.copies)  # no special case applies
        self.plans: Any = None if self.device < 0 else _cuda().PlanSet(problem, self.device)
        # byte extents for the aliasing check with out=: (out lo, out hi), then (slot, name, lo, hi) per operand
        size, extents = problem.itemsize, problem.extents
        self.overlaps = (
            tuple(e * size for e in extents["out"]) if "out" in extents else (0, 0),
            tuple((slot, name, extents[name][0] * size, extents[name][1] * size)
                  for slot, name in enumerate(("a", "b", "c", "bias"))
                  if name in extents and extents[name][0] != extents[name][1]),
        )  # fmt: skip
        self.used = False  # the cache's second chance: set on a hit, cleared when passed over for eviction


_cuda_backend: Any = None
_autotune: bool | None = None  # set_autotune() before the CUDA backend was loaded


def _cuda() -> Any:
    """The CUDA backend module, imported on the first GPU problem (it needs the [cuda] extra)."""
    global _cuda_backend
    if _cuda_backend is None:
        try:
            from .backends import cuda
        except ImportError as error:
            raise BackendUnavailableError(
                f"matmul: GPU operands need the CUDA backend: pip install 'gemmbridge[cuda]' ({error})"
            ) from error
        _cuda_backend = cuda
        if _autotune is not None:
            cuda.autotune.enabled = _autotune
    return _cuda_backend


def _cache() -> OrderedDict:
    """This thread's problem/plan cache (plans hold per-call scalars, so threads don't share them)."""
    try:
        return _local.cache
    except AttributeError:
        _local.cache = OrderedDict()
        return _local.cache


def cache_size() -> int:
    """Number of problems cached by the calling thread."""
    return len(_cache())


def clear_cache() -> None:
    """Drop the calling thread's cached problems and vendor plans."""
    _cache().clear()


def set_autotune(enabled: bool) -> None:
    """Time cuBLASLt's candidate algorithms once per new GPU problem and keep the fastest.

    Off by default (also set by ``GEMMBRIDGE_AUTOTUNE=1``). The first call of each new
    problem then waits for the GPU once; plans made before the switch keep their choice.
    """
    global _autotune
    _autotune = bool(enabled)
    if _cuda_backend is not None:
        _cuda_backend.autotune.enabled = _autotune


def _framework_of(fw: ArrayAdapter, x: Any, name: str, a: Any) -> None:
    if adapter_for(x, name) is not fw:
        raise OperandTypeError(
            f"matmul: a is a {type(a).__module__}.{type(a).__name__}, {name} is a "
            f"{type(x).__module__}.{type(x).__name__} — operands come from different frameworks"
        )


def matmul(
    a: Any,
    b: Any,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    c: Any = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: Any = None,
    epilogue: str = "none",
    out: Any = None,
    allow_tf32: bool | None = None,
) -> Any:
    """``epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` in the caller's framework.

    Follows numpy ``matmul`` semantics (1-D operands promoted then squeezed,
    batch dims broadcast). ``op(x)`` swaps the last two dims of ``x`` when
    ``transpose_x`` is set. ``c`` (optional) has the result's shape (its batch
    dims may broadcast) and is scaled by ``beta``; ``bias`` has shape ``(N,)``
    and is added to every row; ``epilogue`` is ``"none"``, ``"relu"`` or
    ``"gelu"`` (tanh approximation). ``out`` receives the result in place and
    may be ``c`` itself. ``allow_tf32`` (float32 on CUDA): ``None`` follows the
    framework's flag (``torch.backends.cuda.matmul.allow_tf32``...).
    """
    fw = BY_TYPE.get(type(a)) or adapter_for(a, "a")
    if type(b) is not type(a):
        _framework_of(fw, b, "b", a)
    if c is not None and type(c) is not type(a):
        _framework_of(fw, c, "c", a)
    if bias is not None and type(bias) is not type(a):
        _framework_of(fw, bias, "bias", a)
    if out is not None:
        if type(out) is not type(a):
            _framework_of(fw, out, "out", a)
        if not fw.writable(out):
            raise OptionError(
                f"{names(fw.meta(a), fw.meta(b))}, out is {fw.meta(out)} — out is read-only"
                + (f" ({fw.name} arrays are immutable: out= is not supported for them)" if not fw.mutable else "")
            )
    if type(transpose_a) is not bool or type(transpose_b) is not bool:
        transpose_a, transpose_b = (
            _flag(fw, a, b, f"transpose_{n}", v) for n, v in (("a", transpose_a), ("b", transpose_b))
        )
    if type(alpha) is not float:
        alpha = _scalar(fw, a, b, "alpha", alpha)
    if type(beta) is not float:
        beta = _scalar(fw, a, b, "beta", beta)
    kc = None if c is None else fw.key(c)
    key = (
        fw.name, fw.key(a), fw.key(b), kc,
        None if bias is None else fw.key(bias),
        None if out is None else kc if out is c else fw.key(out),
        transpose_a, transpose_b, epilogue,
    )  # fmt: skip
    try:
        cache = _local.cache
    except AttributeError:
        cache = _cache()
    try:
        entry = cache.get(key)
    except TypeError:  # an unhashable epilogue (the one option not checked above): describe() refuses it
        entry = None
    if entry is None:
        entry = _Entry(describe(
            fw.meta(a), fw.meta(b),
            c=None if c is None else fw.meta(c),
            bias=None if bias is None else fw.meta(bias),
            out=None if out is None else fw.meta(out),
            transpose_a=transpose_a, transpose_b=transpose_b, epilogue=epilogue,
        ))  # fmt: skip
        if len(cache) >= PLAN_CACHE_SIZE:
            _evict(cache)
        cache[key] = entry
    else:
        entry.used = True
    problem = entry.problem
    # with out=, the operands' addresses are read once: for the aliasing check and for the vendor call
    pointers = None if out is None else _check_aliasing(fw, entry, a, b, c, bias, out)
    if not entry.plain:
        if problem.empty:
            return out if out is not None else fw.empty(problem.out_shape, a)
        if problem.k == 0:
            return _zero_k(fw, problem, a, b, c, alpha, beta, bias, out, allow_tf32)
        if entry.device >= 0:  # layouts cuBLASLt cannot describe; NumPy's matmul takes any strides
            copies = problem.copies
            a = fw.contiguous(a) if "a" in copies else a
            b = fw.contiguous(b) if "b" in copies else b
            c = fw.contiguous(c) if "c" in copies else c
            bias = fw.contiguous(bias) if "bias" in copies else bias
            pointers = None  # copies have addresses of their own
    if entry.device < 0:
        return _run_cpu(fw, problem, a, b, c, bias, out, alpha, beta)
    if fw.current_device() != entry.device:
        with fw.device_guard(entry.device):
            return _cuda_backend.execute(fw, entry.plans, a, b, c, bias, out, alpha, beta, allow_tf32, pointers)
    return _cuda_backend.execute(fw, entry.plans, a, b, c, bias, out, alpha, beta, allow_tf32, pointers)


def _evict(cache: OrderedDict) -> None:
    """Drop one entry: the oldest not used since it was last passed over (a second-chance approximation of
    LRU that costs a hit nothing but a flag; a full pass clears every flag, so this ends)."""
    while True:
        key, entry = cache.popitem(last=False)
        if not entry.used:
            return
        entry.used = False
        cache[key] = entry


def _flag(fw: ArrayAdapter, a: Any, b: Any, name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise OptionError(f"{names(fw.meta(a), fw.meta(b))} — {name} must be True or False, not {value!r}")


def _scalar(fw: ArrayAdapter, a: Any, b: Any, name: str, value: Any) -> float:
    """A Python or NumPy number as float; arrays and tensors are refused (reading one would synchronize)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(
            f"{names(fw.meta(a), fw.meta(b))} — {name} must be a Python or NumPy number, not {type(value).__name__}"
        )
    return float(value)


def _check_aliasing(fw: ArrayAdapter, entry: _Entry, a: Any, b: Any, c: Any, bias: Any, out: Any) -> tuple:
    """AliasError when ``out`` overlaps an operand other than ``c`` itself; else the addresses of
    (a, b, c, bias, out), 0 for an absent operand."""
    pout = fw.pointer(out)
    pointers = (
        fw.pointer(a), fw.pointer(b),
        pout if c is out else 0 if c is None else fw.pointer(c),
        0 if bias is None else fw.pointer(bias),
        pout,
    )  # fmt: skip
    (out_lo, out_hi), operands = entry.overlaps
    if out_lo == out_hi:
        return pointers
    out_lo += pout
    out_hi += pout
    for slot, name, lo, hi in operands:
        ptr = pointers[slot]
        if ptr + hi <= out_lo or out_hi <= ptr + lo:
            continue
        if name == "c" and (c is out or (ptr == pout and fw.key(c) == fw.key(out))):
            continue  # accumulating in place: out is c
        extra = "" if name in ("a", "b") else f", {name} is {fw.meta((a, b, c, bias)[slot])}"
        raise AliasError(
            f"{names(fw.meta(a), fw.meta(b))}{extra}, out is {fw.meta(out)} — out overlaps {name} "
            "(out may only be c itself)"
        )
    return pointers


def _zero_k(
    fw: ArrayAdapter,
    problem: Problem,
    a: Any,
    b: Any,
    c: Any,
    alpha: float,
    beta: float,
    bias: Any,
    out: Any,
    allow_tf32: bool | None,
) -> Any:
    """K = 0: the product is zero; run K = 1 on zeros so c, bias and the epilogue still apply."""
    sa, sb = tuple(fw.meta(a).shape), tuple(fw.meta(b).shape)
    if len(sa) == 1:
        sa = (1,)
    else:
        sa = sa[:-2] + (1, sa[-1]) if problem.transpose_a else sa[:-1] + (1,)
    if len(sb) == 1:
        sb = (1,)
    else:
        sb = sb[:-1] + (1,) if problem.transpose_b else sb[:-2] + (1, sb[-1])
    return matmul(
        fw.zeros(sa, a),
        fw.zeros(sb, b),
        transpose_a=problem.transpose_a,
        transpose_b=problem.transpose_b,
        c=c,
        alpha=alpha,
        beta=beta,
        bias=bias,
        epilogue=problem.epilogue,
        out=out,
        allow_tf32=allow_tf32,
    )


def _run_cpu(
    fw: ArrayAdapter, problem: Problem, a: Any, b: Any, c: Any, bias: Any, out: Any, alpha: float, beta: float
) -> Any:
    if fw.mutable:
        result = out if out is not None else fw.empty(problem.out_shape, a)
        target = fw.to_numpy(result)
    else:
        result = None
        target = np.empty(problem.out_shape, dtype=fw.to_numpy(a).dtype)
    cpu.run(
        problem, fw.to_numpy(a), fw.to_numpy(b),
        None if c is None else fw.to_numpy(c),
        None if bias is None else fw.to_numpy(bias),
        target, alpha, beta if c is not None else 0.0,
    )  # fmt: skip
    return result if result is not None else fw.from_numpy(target, a)
