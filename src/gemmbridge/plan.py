"""Plans: one GEMM described once and run many times, and the process-wide cache behind ``matmul``.

A ``Plan`` is made from example operands (only their shapes, strides, dtypes and device are read)
and owns everything that can be prepared once: the validated ``Problem``, the vendor's
descriptors and chosen algorithm for each pointer alignment, its workspaces' keys and captured
graphs. ``run`` then takes operands with the same layout, any number of times, from any thread.
``matmul`` is a cached wrapper: one plan per distinct call layout, kept in a bounded cache that
every thread shares (autograd runs backward on a thread of its own).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np

from . import epilogues
from .arrays import BY_TYPE, CallContext, TensorView, view_for
from .backends import cpu
from .errors import AliasError, BackendUnavailableError, OperandTypeError, OptionError, allocation_failed
from .problem import ITEMSIZE, READ_ONLY, Operands, TensorMeta, describe, names

PLAN_CACHE_SIZE = 512
_new = tuple.__new__  # Operands(...) without NamedTuple's slower constructor (hot path)
_D, _AUX, _BIAS_GRAD = 3, 5, 6  # slots of Operands

_cuda_backend: Any = None
# set_autotune, set_kernels, set_graphs: (module of the CUDA backend, attribute) → value, applied when it loads
_settings: dict[tuple[str, str], Any] = {}
_settings_lock = threading.Lock()  # a setting and the backend's loading: the last setting made is the one it keeps
KERNEL_MODES = ("auto", "on", "off")


def cuda() -> Any:
    """The CUDA backend module, imported on the first GPU problem (it needs the [cuda] extra)."""
    global _cuda_backend
    if _cuda_backend is None:
        try:
            from .backends import cuda as backend
        except ImportError as error:
            raise BackendUnavailableError(
                f"matmul: GPU operands need the CUDA backend: pip install 'gemmbridge[cuda]' ({error})"
            ) from error
        with _settings_lock:  # the settings applied, then the backend published: no set_* call falls in between
            if _cuda_backend is None:
                for (module, attribute), value in _settings.items():
                    setattr(getattr(backend, module), attribute, value)
                _cuda_backend = backend
    return _cuda_backend


def _set(module: str, attribute: str, value: Any) -> None:
    """The CUDA backend's ``module.attribute`` set to ``value``: now if it is loaded, else when it loads."""
    with _settings_lock:
        _settings[module, attribute] = value
        if _cuda_backend is not None:
            setattr(getattr(_cuda_backend, module), attribute, value)


def _flag(setter: str, enabled: Any) -> bool:
    """``enabled`` as a bool, or OptionError naming ``setter`` when it is not one."""
    if not isinstance(enabled, (bool, np.bool_)):
        raise OptionError(f"{setter}: enabled must be True or False, not {enabled!r}")
    return bool(enabled)


def set_autotune(enabled: bool) -> None:
    """Time cuBLASLt's candidate algorithms once per new GPU plan and keep the fastest.

    Off by default (also set by ``GEMMBRIDGE_AUTOTUNE=1``). The first call of each new plan
    then waits for the GPU once; plans made before the switch keep their choice.
    """
    _set("autotune", "enabled", _flag("set_autotune", enabled))


def set_kernels(mode: str) -> None:
    """Serve skinny GEMMs with the project's own kernels where they measured faster than cuBLASLt
    (``"auto"``, the default), wherever they can (``"on"``), or never (``"off"``: cuBLASLt only); also set
    by ``GEMMBRIDGE_KERNELS``. ``matmul``'s cached plans are dropped so that its next calls decide again;
    ``Plan`` objects made before keep their choice. See ``docs/kernels.md``.
    """
    if mode not in KERNEL_MODES:
        raise OptionError(f"set_kernels: mode must be one of {KERNEL_MODES}, not {mode!r}")
    _set("kernels", "mode", mode)
    PLANS.clear()


def set_graphs(enabled: bool) -> None:
    """Record small GPU products (≤ 2²⁷ FLOPs) met again with the same pointers as CUDA graphs, and replay them.

    On by default (``GEMMBRIDGE_GRAPHS=0`` turns it off). A graph is recorded by a stream capture on a private
    stream; while it lasts, CUDA refuses a device-wide synchronize (``torch.cuda.synchronize()``, entering
    ``torch.cuda.graph``) from any other thread of the process on that GPU. A program that synchronizes the
    device from one thread while another calls gemmbridge turns the recording off. Off, every call (of every
    plan, those made before too) is launched directly: nothing recorded, nothing replayed, and autotuning times
    small candidates call by call (``docs/architecture.md``).
    """
    _set("graphs", "enabled", _flag("set_graphs", enabled))


def same_framework(view: TensorView, a: Any, b: Any, **others: Any) -> None:
    """OperandTypeError when ``b`` or a given optional operand comes from another framework than ``a``."""
    for name, x in (("b", b), *others.items()):
        if (x is not None or name == "b") and type(x) is not type(a) and view_for(x, name) is not view:
            raise OperandTypeError(
                f"matmul: a is a {type(a).__module__}.{type(a).__name__}, {name} is a "
                f"{type(x).__module__}.{type(x).__name__} — operands come from different frameworks"
            )


def call_key(
    view: TensorView, a: Any, b: Any, c: Any, bias: Any, out: Any, aux: Any, bias_grad: Any, options: tuple
) -> tuple:
    """The cache key of a call: every operand's layout key and the options (pointers aside)."""
    key = view.key
    kc = None if c is None else key(c)
    return (
        view.name, key(a), key(b), kc,
        None if bias is None else key(bias),
        None if out is None else kc if out is c else key(out),
        None if aux is None else key(aux),
        None if bias_grad is None else key(bias_grad),
        *options,
    )  # fmt: skip


def _standin(meta: TensorMeta, address: int) -> np.ndarray:
    """A NumPy view with ``meta``'s shape and byte strides at ``address`` (never read: for overlap tests)."""
    size = ITEMSIZE.get(meta.dtype, 1)

    class Interface:
        __array_interface__ = {
            "shape": meta.shape,
            "strides": tuple(s * size for s in meta.strides),
            "typestr": f"|V{size}",
            "data": (address, True),
            "version": 3,
        }

    return np.asarray(Interface())


def shares_memory(x: TensorMeta, px: int, y: TensorMeta, py: int) -> bool:
    """True when the views ``x`` at ``px`` and ``y`` at ``py`` share a byte (exact; too hard to tell: True)."""
    try:
        return bool(np.shares_memory(_standin(x, px), _standin(y, py), max_work=1 << 20))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:
        return True


def _public_name(slot: int) -> str:
    """The keyword an operand slot is passed as (the result ``d`` is ``out``)."""
    return "out" if slot == _D else Operands._fields[slot]


def _warn_from_caller(kind: str, flag: int) -> None:
    """NumPy floating-point warnings of the CPU backend, attributed to the caller's line."""
    frame: FrameType | None = sys._getframe(1)
    level = 2  # stacklevel 2 is our caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith("gemmbridge."):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"matmul: {kind} encountered in the CPU backend", RuntimeWarning, stacklevel=level)


class Plan:
    """``D = epilogue(alpha · op(a) @ op(b) + beta · c + bias)``, described once for operands like these.

    Example::

        plan = gemmbridge.Plan(x, w, transpose_b=True, bias=b, epilogue="gelu_aux")
        y, aux = plan.run(x, w, bias=b)          # again and again, with new tensors of the same layout

    Args are those of ``gemmbridge.matmul`` that fix the layout: the example operands (only their
    shape, strides, dtype and device are read; ``c``, ``bias``, ``out``, ``aux``, ``bias_grad``
    when the runs pass them), the transpose flags, the epilogue (``gemmbridge.epilogues``) and
    ``out_dtype``. ``run`` takes the operands and the per-call values (``alpha``, ``beta``,
    ``allow_tf32``). ``close()`` (or ``with``) releases the vendor objects early.
    """

    def __init__(
        self,
        a: Any,
        b: Any,
        *,
        transpose_a: bool = False,
        transpose_b: bool = False,
        c: Any = None,
        bias: Any = None,
        epilogue: str = "none",
        out: Any = None,
        aux: Any = None,
        bias_grad: Any = None,
        out_dtype: Any = None,
    ) -> None:
        view = view_for(a, "a")
        same_framework(view, a, b, c=c, bias=bias, out=out, aux=aux, bias_grad=bias_grad)
        options = (check_flag(view, a, b, "transpose_a", transpose_a), check_flag(view, a, b, "transpose_b",
                   transpose_b), epilogue, out_dtype)  # fmt: skip
        key = call_key(view, a, b, c, bias, out, aux, bias_grad, options)
        self._build(view, key, a, b, c, bias, out, aux, bias_grad, options)

    @classmethod
    def for_call(
        cls, view: TensorView, key: tuple, a: Any, b: Any, c: Any, bias: Any, out: Any, aux: Any, bias_grad: Any,
        options: tuple,
    ) -> Plan:  # fmt: skip
        """A plan for a call whose key and checked options ``matmul`` has already made."""
        plan = cls.__new__(cls)
        plan._build(view, key, a, b, c, bias, out, aux, bias_grad, options)
        return plan

    def _build(
        self, view: TensorView, key: tuple, a: Any, b: Any, c: Any, bias: Any, out: Any, aux: Any, bias_grad: Any,
        options: tuple,
    ) -> None:  # fmt: skip
        metas = Operands(*(None if x is None else view.meta(x) for x in (a, b, c, out, bias, aux, bias_grad)))
        transpose_a, transpose_b, epilogue, out_dtype = options
        problem = describe(
            metas.a, metas.b, c=metas.c, bias=metas.bias, out=metas.d, aux=metas.aux, bias_grad=metas.bias_grad,
            transpose_a=transpose_a, transpose_b=transpose_b, epilogue=epilogue, out_dtype=out_dtype,
        )  # fmt: skip
        kind = epilogues.TABLE[problem.epilogue]
        self.view, self.key, self.options, self.metas, self.problem = view, key, options, metas, problem
        self.device = -1 if problem.device == "cpu" else int(problem.device.split(":")[1])
        self.state: Any = None if self.device < 0 else cuda().PlanState(problem, self.device)
        # operands the vendor reads only in the other orientation: copied transposed first (CUDA backend)
        self.flip = () if self.device < 0 else cuda().layouts.transposed_copies(problem)
        self.plain = not (problem.empty or problem.k == 0 or (problem.copies and self.device >= 0) or self.flip)
        self.returns = "aux" if kind.aux_out != "none" else "bias_grad" if kind.bias_grad != "none" else "d"
        written = [_D] if metas.d is not None else []
        if metas.aux is not None and kind.aux_out != "none":
            written.append(_AUX)
        if metas.bias_grad is not None:
            written.append(_BIAS_GRAD)
        read = [Operands._fields.index(n) for n in READ_ONLY] + ([_AUX] if kind.aux_in != "none" else [])
        self.outputs_given = tuple(written)
        # byte ranges that must not meet: (written slot, other slot, its lo, hi, the other's lo, hi)
        extents = problem.byte_extents
        self.overlaps = tuple(
            (w, r, *extents[w], *extents[r])
            for i, w in enumerate(written)
            for r in (*read, *written[i + 1 :])
            if metas[r] is not None and extents[r][0] != extents[r][1] and extents[w][0] != extents[w][1]
        )
        self.used = False  # the cache's second chance: set on a hit, cleared when passed over for eviction

    def __repr__(self) -> str:
        p = self.problem
        return (
            f"Plan(m={p.m}, n={p.n}, k={p.k}, batch={p.batch_shape}, {p.dtype}→{p.result_dtype}, "
            f"epilogue={p.epilogue!r}, {self.view.name} on {p.device})"
        )

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the vendor descriptors and captured graphs now (the plan cannot run afterwards)."""
        if self.state is not None:
            cuda().release(self.state)
            self.state = None

    def run(
        self,
        a: Any,
        b: Any,
        *,
        c: Any = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        bias: Any = None,
        out: Any = None,
        aux: Any = None,
        bias_grad: Any = None,
        allow_tf32: bool | None = None,
    ) -> Any:
        """Compute the plan's GEMM for these operands; returns ``d``, or ``(d, aux)`` / ``(d, bias_grad)``
        for epilogues with those outputs (``gemmbridge.epilogues``)."""
        view, options = self.view, self.options
        try:
            key = (
                () if BY_TYPE.get(type(a)) is not view else call_key(view, a, b, c, bias, out, aux, bias_grad, options)
            )
        except Exception:  # an operand of another framework, or without strides: diagnosed below
            key = ()
        if key != self.key:
            self._refuse(a, b, c, bias, out, aux, bias_grad)
        if view.autograd is not None and view.autograd(a, b, c, bias):
            raise OptionError(
                f"Plan.run: {names(self.metas.a, self.metas.b).removeprefix('matmul: ')} — inputs require grad and a "
                "Plan is not differentiable: call it under torch.no_grad(), or use gemmbridge.matmul / gemmbridge.torch"
            )
        if type(alpha) is not float:
            alpha = check_scalar(view, a, b, "alpha", alpha)
        if type(beta) is not float:
            beta = check_scalar(view, a, b, "beta", beta)
        if allow_tf32 is not None and type(allow_tf32) is not bool:
            allow_tf32 = check_tf32(view, a, b, allow_tf32)
        return self.execute(a, b, c, alpha, beta, bias, out, aux, bias_grad, allow_tf32)

    def _refuse(self, a: Any, b: Any, c: Any, bias: Any, out: Any, aux: Any, bias_grad: Any) -> None:
        """The error for operands that differ from the plan's: another framework, or another layout."""
        view = self.view
        if view_for(a, "a") is not view:
            raise OperandTypeError(
                f"Plan.run: a is a {type(a).__module__}.{type(a).__name__}, the plan was made for {view.name} arrays"
            )
        same_framework(view, a, b, c=c, bias=bias, out=out, aux=aux, bias_grad=bias_grad)
        key = call_key(view, a, b, c, bias, out, aux, bias_grad, self.options)
        given = {"a": a, "b": b, "c": c, "bias": bias, "out": out, "aux": aux, "bias_grad": bias_grad}
        planned = dict(zip(given, (self.metas.a, self.metas.b, self.metas.c, self.metas.bias, self.metas.d,
                                   self.metas.aux, self.metas.bias_grad)))  # fmt: skip
        differ = [
            f"{name} is {'absent' if x is None else view.meta(x)}, the plan's {planned[name] or 'absent'}"
            for i, (name, x) in enumerate(given.items())
            if key[1 + i] != self.key[1 + i]
        ]
        raise OptionError(
            f"Plan.run: {names(view.meta(a), view.meta(b)).removeprefix('matmul: ')} — "
            f"{'; '.join(differ)}: a plan runs operands of the layout it was made for (make a new plan)"
        )

    def execute(
        self, a: Any, b: Any, c: Any, alpha: float, beta: float, bias: Any, out: Any, aux: Any, bias_grad: Any,
        allow_tf32: bool | None,
    ) -> Any:  # fmt: skip
        """``run`` for operands and options already checked against the plan (``matmul``'s hot path)."""
        view = self.view
        ptrs = None if not self.outputs_given else self._check_outputs(a, b, c, bias, out, aux, bias_grad)
        if not self.plain:
            problem = self.problem
            if problem.empty or problem.k == 0:
                return self._degenerate(a, b, c, alpha, beta, bias, out, aux, allow_tf32)
            if self.flip:
                return self._flipped(a, b, c, alpha, beta, bias, out, aux, bias_grad, allow_tf32)
            ctx = view.context(self.device, a)
            a, b, c, bias = (ctx.contiguous(x) if name in problem.copies else x
                             for name, x in (("a", a), ("b", b), ("c", c), ("bias", bias)))  # fmt: skip
            ptrs = None  # copies have addresses of their own
        if self.device < 0:
            d, aux, bias_grad = self._run_cpu(a, b, c, alpha, beta, bias, out, aux, bias_grad)
        else:
            if self.state is None:
                raise OptionError(f"{self!r} was closed")
            run = _cuda_backend.run
            if view.current_device() != self.device:
                with view.device_guard(self.device):
                    ctx = view.context(self.device, a)
                    d, aux, bias_grad = run(self.state, view, ctx, a, b, c, out, bias, aux, bias_grad, ptrs, alpha,
                                            beta, allow_tf32)  # fmt: skip
            else:
                ctx = view.context(self.device, a)
                d, aux, bias_grad = run(self.state, view, ctx, a, b, c, out, bias, aux, bias_grad, ptrs, alpha, beta,
                                        allow_tf32)  # fmt: skip
        if view.written is not None and self.outputs_given:
            for x in (out, aux if _AUX in self.outputs_given else None, bias_grad):
                if x is not None:
                    view.written(x)
        if self.returns == "d":
            return d
        return (d, aux) if self.returns == "aux" else (d, bias_grad)

    def _check_outputs(self, a: Any, b: Any, c: Any, bias: Any, out: Any, aux: Any, bias_grad: Any) -> Operands:
        """Refuse outputs the framework forbids writing or that overlap another operand (``out`` may be ``c``
        itself); return every operand's address (0 for an absent one)."""
        view = self.view
        for slot in self.outputs_given:
            reason = view.writable(out if slot == _D else aux if slot == _AUX else bias_grad)
            if reason is not None:
                name = _public_name(slot)
                raise OptionError(
                    f"{names(self.metas.a, self.metas.b)}, {name} is {self.metas[slot]} — {name} cannot be written: "
                    f"{reason}"
                )
        pointer = view.pointer
        pout = 0 if out is None else pointer(out)
        ptrs = _new(Operands, (
            pointer(a), pointer(b), pout if c is out and out is not None else 0 if c is None else pointer(c), pout,
            0 if bias is None else pointer(bias), 0 if aux is None else pointer(aux),
            0 if bias_grad is None else pointer(bias_grad),
        ))  # fmt: skip
        for w, r, wlo, whi, rlo, rhi in self.overlaps:
            pw, pr = ptrs[w], ptrs[r]
            if pw + whi <= pr + rlo or pr + rhi <= pw + wlo:
                continue
            if w == _D and r == 2 and (c is out or (pr == pw and view.key(c) == view.key(out))):
                continue  # accumulating in place: out is c
            if not shares_memory(self.metas[w], pw, self.metas[r], pr):
                continue  # interleaved views that never meet
            wname, rname = _public_name(w), _public_name(r)
            extra = "" if rname in ("a", "b") else f", {rname} is {self.metas[r]}"
            raise AliasError(
                f"{names(self.metas.a, self.metas.b)}{extra}, {wname} is {self.metas[w]} — {wname} overlaps {rname}"
                + (" (out may only be c itself)" if wname == "out" else "")
            )
        return ptrs

    def _degenerate(
        self, a: Any, b: Any, c: Any, alpha: float, beta: float, bias: Any, out: Any, aux: Any,
        allow_tf32: bool | None,
    ) -> Any:  # fmt: skip
        """An empty result, or K = 0: the product is zero; K = 1 on zeros applies c, bias and the epilogue."""
        problem, ctx = self.problem, self.view.context(self.device, a)
        if problem.empty:
            return out if out is not None else ctx.empty(problem.out_shape, problem.result_dtype)
        sa, sb = tuple(self.metas.a.shape), tuple(self.metas.b.shape)
        sa = (1,) if len(sa) == 1 else sa[:-2] + (1, sa[-1]) if problem.transpose_a else sa[:-1] + (1,)
        sb = (1,) if len(sb) == 1 else sb[:-1] + (1,) if problem.transpose_b else sb[:-2] + (1, sb[-1])
        options = (problem.transpose_a, problem.transpose_b, problem.epilogue, problem.result_dtype)
        return call(self.view, ctx.zeros(sa, problem.dtype), ctx.zeros(sb, problem.dtype), c, bias, out, aux, None,
                    options, alpha, beta, allow_tf32)  # fmt: skip

    def _flipped(
        self, a: Any, b: Any, c: Any, alpha: float, beta: float, bias: Any, out: Any, aux: Any, bias_grad: Any,
        allow_tf32: bool | None,
    ) -> Any:  # fmt: skip
        """The call with the operands in ``self.flip`` copied transposed and their transpose flags flipped:
        the same product, in the orientation the vendor reads (``layouts.transposed_copies``)."""
        problem, ctx = self.problem, self.view.context(self.device, a)
        transpose_a, transpose_b = problem.transpose_a, problem.transpose_b
        if "a" in self.flip:
            a, transpose_a = ctx.transposed(a), not transpose_a
        if "b" in self.flip:
            b, transpose_b = ctx.transposed(b), not transpose_b
        options = (transpose_a, transpose_b, problem.epilogue, problem.result_dtype)
        return call(self.view, a, b, c, bias, out, aux, bias_grad, options, alpha, beta, allow_tf32)

    def _run_cpu(
        self, a: Any, b: Any, c: Any, alpha: float, beta: float, bias: Any, out: Any, aux: Any, bias_grad: Any
    ) -> tuple[Any, Any, Any]:
        problem, view = self.problem, self.view
        ctx = view.context(-1, a)
        kind = epilogues.TABLE[problem.epilogue]
        d, d_host = self._host_output(ctx, out, problem.out_shape, problem.result_dtype)
        aux_host = None
        if kind.aux_out != "none":
            padded = epilogues.aux_is_padded(problem.epilogue, problem.n)
            aux, aux_host = self._host_output(ctx, aux, problem.aux_shape or (), problem.aux_dtype, zero=padded)
        elif aux is not None:
            aux_host = ctx.host(aux)
        bias_grad_host = None
        if problem.bias_grad_length:
            bias_grad, bias_grad_host = self._host_output(
                ctx, bias_grad, (problem.bias_grad_length,), problem.result_dtype
            )
        host = _new(Operands, (
            ctx.host(a), ctx.host(b), None if c is None else ctx.host(c), d_host,
            None if bias is None else ctx.host(bias), aux_host, bias_grad_host,
        ))  # fmt: skip
        try:
            with np.errstate(over="call", divide="call", invalid="call", call=_warn_from_caller):
                cpu.run(problem, host, alpha, beta if c is not None else 0.0, ctx.blas)
        except MemoryError as error:
            raise allocation_failed("result", problem.out_shape, problem.result_dtype, problem.result_itemsize,
                                    "cpu", error) from error  # fmt: skip
        if view.mutable:
            return d, aux, bias_grad
        return (ctx.from_host(d_host), None if aux_host is None else ctx.from_host(aux_host),
                None if bias_grad_host is None else ctx.from_host(bias_grad_host))  # fmt: skip

    def _host_output(
        self, ctx: CallContext, given: Any, shape: tuple[int, ...], dtype: str, zero: bool = False
    ) -> tuple[Any, Any]:
        """An output (the given one, or a new one) and the NumPy array the CPU backend writes it through."""
        if given is not None:
            return given, ctx.host(given)
        try:
            if self.view.mutable:
                made = ctx.zeros(shape, dtype) if zero else ctx.empty(shape, dtype)
                return made, ctx.host(made)
            from .arrays.numpy import numpy_dtype

            return None, (np.zeros if zero else np.empty)(shape, dtype=numpy_dtype(dtype))
        except MemoryError as error:
            raise allocation_failed("result", shape, dtype, ITEMSIZE[dtype], "cpu", error) from error


def check_flag(view: TensorView, a: Any, b: Any, name: str, value: Any) -> bool:
    if type(value) is bool:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise OptionError(f"{names(view.meta(a), view.meta(b))} — {name} must be True or False, not {value!r}")


def check_tf32(view: TensorView, a: Any, b: Any, value: Any) -> bool | None:
    if value is None or type(value) is bool:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise OptionError(f"{names(view.meta(a), view.meta(b))} — allow_tf32 must be None, True or False, not {value!r}")


def check_scalar(view: TensorView, a: Any, b: Any, name: str, value: Any) -> float:
    """A Python or NumPy number as float; arrays and tensors are refused (reading one would synchronize)."""
    if type(value) is float:
        return value
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(
            f"{names(view.meta(a), view.meta(b))} — {name} must be a Python or NumPy number, not {type(value).__name__}"
        )
    try:
        return float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        raise OptionError(
            f"{names(view.meta(a), view.meta(b))} — {name} ({type(value).__name__}) is beyond the float range"
        ) from None


def call(
    view: TensorView, a: Any, b: Any, c: Any, bias: Any, out: Any, aux: Any, bias_grad: Any, options: tuple,
    alpha: float, beta: float, allow_tf32: bool | None,
) -> Any:  # fmt: skip
    """A checked call through the process-wide plan cache: its plan found (or made and kept), then run."""
    try:
        key = call_key(view, a, b, c, bias, out, aux, bias_grad, options)
        plan = PLANS.plans.get(key)
    except (TypeError, RuntimeError):  # an unhashable option, or an operand without strides: described below
        key, plan = (), None
    if plan is None:
        plan = Plan.for_call(view, key, a, b, c, bias, out, aux, bias_grad, options)
        if key:
            plan = PLANS.add(key, plan)
    else:
        plan.used = True
    return plan.execute(a, b, c, alpha, beta, bias, out, aux, bias_grad, allow_tf32)


class PlanCache:
    """Plans by call key, shared by every thread; bounded (second-chance eviction, a hit costs a flag).

    An evicted plan is only dropped: a thread still running it keeps it alive, and its vendor objects
    are freed when the last reference goes (graph executables wait for a moment outside any capture).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.plans: dict[tuple, Plan] = {}
        self.lock = threading.Lock()
        self.on_clear: list[Callable[[], None]] = []  # caches above the core that hold plans (the torch lane)

    def add(self, key: tuple, plan: Plan) -> Plan:
        with self.lock:
            existing = self.plans.get(key)
            if existing is not None:
                return existing
            if len(self.plans) >= self.size:
                self._evict()
            self.plans[key] = plan
        return plan

    def _evict(self) -> None:
        """Drop the oldest plan not used since it was last passed over (a full pass clears every flag)."""
        plans = self.plans
        while True:
            key = next(iter(plans))
            plan = plans.pop(key)
            if not plan.used:
                return
            plan.used = False
            plans[key] = plan

    def clear(self) -> None:
        with self.lock:
            self.plans.clear()
        for forget in self.on_clear:
            forget()
        if _cuda_backend is not None:
            _cuda_backend.drain()


PLANS = PlanCache(PLAN_CACHE_SIZE)
