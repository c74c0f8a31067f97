"""The training ops' launch lane: each GEMM of a forward or backward resolved once per layout, then launched.

``gemm(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype, out)`` computes
``D = epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` (``gemmbridge.epilogues``) and returns
``(D, extra)``: the epilogue's aux or bias gradient, else None. ``out`` (a tensor the op made, or ``c``
itself to accumulate in place) receives ``D``. The first call of a layout (shapes, strides, dtypes, device,
options) resolves it to one launcher, kept in a table; later calls build the key and launch. Nothing of the
public ``gemmbridge.matmul`` runs per call: no framework detection, option checks, plan cache or output checks
(the ops made every tensor they hand over).

Launchers (docs/architecture.md, "The launch lane"):

- aten's GEMM (``torch.mm``, ``addmm``, ``addmm_`` accumulating with beta = 1, ``F.linear``) with aten's
  activation functions for the epilogues: on the CPU always; on CUDA for the products aten makes with the very
  same cuBLAS(Lt) call (plain epilogue, one dtype), where its host path is as short as any and
  ``torch.compile`` sees the same GEMM. A tuned or own-kernel choice (``gemmbridge tune``, ``set_kernels``,
  ``set_autotune``) moves a layout to gemmbridge's launch instead.
- gemmbridge's CUDA backend with the plan resolved once (``backends.cuda.run``): what aten lacks — fused bias
  and activation with the pre-activation saved (``gelu_aux``), the activation's derivative (``dgelu``,
  ``drelu``), the bias gradient reduced inside the weight-gradient GEMM (``bgrad_a``), float32 results from half
  inputs, bias together with ``c``, the project's own kernels.
- the full ``Plan`` for what the backend's hot path does not take (empty products, K = 0, layouts copied first).

Under ``torch.compile`` the same choice is made from the fake tensors: aten's ops, or the ``gemmbridge::gemm``
custom op for what aten lacks; the compiled graph holds no gemmbridge Python.

aten's forms cover the epilogues the ops ask of them (none, relu, gelu, gelu_aux, dgelu, bgrad_a); ``gelu_aux``'s aux
is then the unpadded pre-activation, which ``dgelu`` reads as it reads the padded one. Autocast is off for every GEMM
here (``uncast``): the ops cast their inputs themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import epilogues, plan
from ..arrays.torch import VIEW, TorchCall
from ..errors import OptionError
from ..problem import describe

Launcher = Callable[..., tuple[Tensor, Any]]
HALF = (torch.float16, torch.bfloat16)
_is_compiling = torch.compiler.is_compiling
_gelu: Any = torch._C._nn.gelu
_gelu_backward = torch.ops.aten.gelu_backward.default

_autocast_enabled = torch.is_autocast_enabled

MAX_LAUNCHERS = 1024  # layouts kept; the oldest is forgotten first (shapes that vary every step stay bounded)
_launchers: dict[tuple, Launcher] = {}
_lock = threading.Lock()  # a miss inserts and may evict: autograd's backward thread resolves layouts too
_zeros: dict[tuple, Tensor] = {}  # a 0-d zero per (dtype, device): addmm's ignored input when beta = 0


def uncast(gemm: Callable[..., Any]) -> Callable[..., Any]:
    """``gemm`` with autocast off for its call where it is on for the operands' device: the ops cast their inputs
    themselves (or, for ``matmul``, never), so none of their GEMMs may be cast again — a backward run inside an
    autocast region, or a compiled graph traced under one, would otherwise round float32 products to the half type."""

    def run(a: Tensor, *args: Any, **kwargs: Any) -> Any:
        kind = a.device.type
        if _autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return gemm(a, *args, **kwargs)
        return gemm(a, *args, **kwargs)

    return run


def gemm(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, transpose_a: bool,
    transpose_b: bool, alpha: float, beta: float, epilogue: str, out_dtype: torch.dtype | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Any]:  # fmt: skip
    """``(D, extra)`` for ``D = epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` (module doc)."""
    if _is_compiling():
        return traced(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype, out)
    return launch(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype, out)


@uncast
def launch(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, transpose_a: bool,
    transpose_b: bool, alpha: float, beta: float, epilogue: str, out_dtype: torch.dtype | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Any]:  # fmt: skip
    """``gemm`` on real tensors: the layout's launcher, resolved the first time (the ``gemmbridge::gemm`` op's
    implementation calls this, never the traced form)."""
    key = (
        a.shape, a.stride(), a.dtype, a.device, a.is_neg(), b.shape, b.stride(), b.dtype, b.device, b.is_neg(),
        None if c is None else (*layout(c), c is out), None if bias is None else layout(bias),
        None if aux is None else layout(aux), None if out is None else layout(out),
        transpose_a, transpose_b, epilogue, out_dtype,
    )  # fmt: skip
    found = _launchers.get(key)
    if found is None:
        found = _resolve(a, b, c, bias, aux, transpose_a, transpose_b, epilogue, out_dtype, out)
        remember(_launchers, key, found)
    return found(a, b, c, bias, aux, alpha, beta, out)


def layout(t: Tensor) -> tuple:
    """What a resolved launcher relies on of an operand besides its address."""
    return t.shape, t.stride(), t.dtype, t.device, t.is_neg()


def remember(table: dict, key: tuple, value: Any) -> None:
    """Keep ``value`` under ``key`` in one of the lane's tables, the oldest entry forgotten past ``MAX_LAUNCHERS``."""
    with _lock:
        if len(table) >= MAX_LAUNCHERS:
            table.pop(next(iter(table)), None)
        table[key] = value


def resolved() -> int:
    """How many layouts the lane holds."""
    return len(_launchers)


def forget(*tables: dict) -> None:
    """Empty these tables of the lane's under the lock ``remember`` takes (its eviction never meets one emptied)."""
    with _lock:
        for table in tables:
            table.clear()


def clear() -> None:
    """Forget every resolved launcher (``gemmbridge.set_kernels`` and ``clear_cache`` call it)."""
    forget(_launchers)


def _aten_serves(dtype: torch.dtype, epilogue: str, out_dtype: torch.dtype | None, c: Any, bias: Any) -> bool:
    """True when aten's GEMM is the same cuBLAS(Lt) call as gemmbridge's: a plain product in one dtype."""
    return epilogue == "none" and (out_dtype is None or out_dtype == dtype) and (c is None or bias is None)


def _resolve(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, ta: bool, tb: bool,
    epilogue: str, out_dtype: torch.dtype | None, out: Tensor | None,
) -> Launcher:  # fmt: skip
    """The launcher of one layout (module doc); the problem is validated here, once."""
    if a.device.type != "cuda":  # the product validated as gemmbridge.matmul would (aten's aux has its own form)
        meta = VIEW.meta
        metas: list[Any] = [None if x is None else meta(x) for x in (a, b, c, out, bias)]
        reads_aux = epilogues.TABLE[epilogue].aux_in != "none"
        describe(metas[0], metas[1], c=metas[2], out=metas[3], bias=metas[4], transpose_a=ta, transpose_b=tb,
                 epilogue="none" if reads_aux else epilogue, out_dtype=out_dtype)  # fmt: skip
        return _aten(a, b, ta, tb, epilogue, out_dtype)
    whole = plan.Plan.for_call(VIEW, (), a, b, c, bias, out, aux, None, (ta, tb, epilogue, out_dtype))
    device, backend, problem = whole.device, plan.cuda(), whole.problem
    if _aten_serves(a.dtype, epilogue, out_dtype, c, bias) and not backend.prefers_own_launch(problem, device):
        return _aten(a, b, ta, tb, epilogue, out_dtype)
    if not whole.plain or problem.out_via_temp:
        return _planned(whole)
    return _backend_launch(backend, whole.state, device)


def _backend_launch(backend: Any, state: Any, device: int) -> Launcher:
    """The CUDA backend's hot path on a plan resolved once: allocate, read pointers and stream, launch."""
    kind = epilogues.TABLE[state.problem.epilogue]
    run, view, aux_out, grad_out = backend.run, VIEW, kind.aux_out != "none", kind.bias_grad != "none"

    def on_device(a: Tensor, b: Tensor, c: Any, bias: Any, aux: Any, alpha: float, beta: float, out: Any) -> Any:
        if torch._C._cuda_getDevice() != device:  # type: ignore[attr-defined]
            with torch.cuda.device(device):
                return on_device(a, b, c, bias, aux, alpha, beta, out)
        d, aux, bias_grad = run(state, view, TorchCall(device, a), a, b, c, out, bias, aux, None, None, alpha, beta,
                                None)  # fmt: skip
        return d, aux if aux_out else bias_grad if grad_out else None

    return on_device


def _planned(whole: plan.Plan) -> Launcher:
    """The whole plan's ``execute``: empty products, K = 0, operands copied first."""
    extra = whole.returns != "d"

    def execute(a: Tensor, b: Tensor, c: Any, bias: Any, aux: Any, alpha: float, beta: float, out: Any) -> Any:
        result = whole.execute(a, b, c, alpha, beta, bias, out, aux, None, None)
        return result if extra else (result, None)

    return execute


def _zero(like: Tensor) -> Tensor:
    """A 0-d zero of ``like``'s dtype and device (made once): addmm's ignored input when beta = 0."""
    key = (like.dtype, like.device)
    zero = _zeros.get(key)
    if zero is None:
        zero = _zeros[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


def _matrix_product(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, ta: bool, tb: bool, alpha: float, beta: float,
    out: Tensor | None, zero: Tensor | None,
) -> Tensor:  # fmt: skip
    """``alpha · op(a) @ op(b) + beta · c + bias`` of matrices with one aten GEMM (into ``out`` when given); ``zero``:
    the 0-d zero that stands for an absent input to ``addmm`` (None where ``torch.compile`` traces: ``mm · alpha``)."""
    if c is None:
        if alpha == 1.0:
            if not ta and tb and out is None:
                return torch.nn.functional.linear(a, b, bias)
            am, bm = (a.t() if ta else a), (b.t() if tb else b)
            if bias is not None:
                return torch.addmm(bias, am, bm) if out is None else torch.addmm(bias, am, bm, out=out)
            return torch.mm(am, bm) if out is None else torch.mm(am, bm, out=out)
        am, bm = (a.t() if ta else a), (b.t() if tb else b)
        if bias is not None:
            return torch.addmm(bias, am, bm, alpha=alpha) if out is None else torch.addmm(bias, am, bm, alpha=alpha,
                                                                                          out=out)  # fmt: skip
        if zero is None:
            return torch.mm(am, bm) * alpha if out is None else torch.mm(am, bm, out=out).mul_(alpha)
        if out is None:
            return torch.addmm(zero, am, bm, beta=0, alpha=alpha)
        return torch.addmm(zero, am, bm, beta=0, alpha=alpha, out=out)
    am, bm = (a.t() if ta else a), (b.t() if tb else b)
    if out is c:
        p = c.addmm_(am, bm, beta=beta, alpha=alpha)
    elif out is not None:
        p = torch.addmm(c, am, bm, beta=beta, alpha=alpha, out=out)
    else:
        p = torch.addmm(c, am, bm, beta=beta, alpha=alpha)
    return p if bias is None else p.add_(bias)


def _product(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, ta: bool, tb: bool, alpha: float, beta: float,
    out_dtype: torch.dtype | None, out: Tensor | None, traced_: bool,
) -> Tensor:  # fmt: skip
    """``alpha · op(a) @ op(b) + beta · c + bias`` with aten's ops (into ``out`` when given), any shapes and dtypes."""
    if out_dtype is not None and out_dtype != a.dtype:  # aten has no half → float32 GEMM on the CPU
        a, b = a.to(out_dtype), b.to(out_dtype)
    if a.dim() == 2 and b.dim() == 2:
        return _matrix_product(a, b, c, bias, ta, tb, alpha, beta, out, None if traced_ else _zero(a))
    p = torch.matmul(a.mT if ta else a, b.mT if tb else b)  # batches: the differentiable gemmbridge.matmul's shapes
    if alpha != 1.0:
        p = p * alpha
    if c is not None and beta != 0.0:  # beta = 0 ignores c, NaN and Inf in it included
        p = p + c * beta if beta != 1.0 else p + c
    if bias is not None:
        p = p + bias
    if out is None:
        return p
    out.copy_(p)
    return out


def _formula(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, ta: bool, tb: bool,
    alpha: float, beta: float, epilogue: str, out_dtype: torch.dtype | None, out: Tensor | None, traced_: bool,
) -> tuple[Tensor, Any]:  # fmt: skip
    """The epilogue's formula over aten's GEMM (``gemmbridge.epilogues``), for the epilogues the ops ask of it."""
    if epilogue == "none":
        return _product(a, b, c, bias, ta, tb, alpha, beta, out_dtype, out, traced_), None
    if epilogue == "relu":
        return _product(a, b, c, bias, ta, tb, alpha, beta, out_dtype, out, traced_).relu_(), None
    if epilogue in ("gelu", "gelu_aux"):
        pre = _product(a, b, c, bias, ta, tb, alpha, beta, out_dtype, None if epilogue == "gelu_aux" else out,
                       traced_)  # fmt: skip
        if epilogue == "gelu":
            return (_gelu(pre, approximate="tanh", out=pre) if out is None else
                    _gelu(pre, approximate="tanh", out=out)), None  # fmt: skip
        d = _gelu(pre, approximate="tanh") if out is None else _gelu(pre, approximate="tanh", out=out)
        return d, pre
    if epilogue not in ("dgelu", "bgrad_a"):
        raise OptionError(f"gemmbridge.torch: the launch lane has no aten form of epilogue {epilogue!r}")
    p = _product(a, b, c, bias, ta, tb, alpha, beta, out_dtype, None, traced_)
    if epilogue == "dgelu":
        assert aux is not None
        p = _gelu_backward(p, aux[..., : p.shape[-1]], approximate="tanh")
    d = p if out is None else out.copy_(p)
    if epilogue == "dgelu":
        return d, None
    op_a = a.t() if ta else a  # bgrad_a: Σ_k op(a), summed in float32 for half inputs, in the result's dtype
    return d, op_a.sum(-1, dtype=torch.float32 if op_a.dtype in HALF else None).to(d.dtype)


def _aten(a: Tensor, b: Tensor, ta: bool, tb: bool, epilogue: str, out_dtype: torch.dtype | None) -> Launcher:
    """aten's form of one layout: a plain product of matrices goes straight to its GEMM, the rest by formula."""
    if epilogue == "none" and (out_dtype is None or out_dtype == a.dtype) and a.dim() == 2 and b.dim() == 2:
        zero = _zero(a)

        def product(a: Tensor, b: Tensor, c: Any, bias: Any, aux: Any, alpha: float, beta: float, out: Any) -> Any:
            return _matrix_product(a, b, c, bias, ta, tb, alpha, beta, out, zero), None

        return product

    def formula(a: Tensor, b: Tensor, c: Any, bias: Any, aux: Any, alpha: float, beta: float, out: Any) -> Any:
        return _formula(a, b, c, bias, aux, ta, tb, alpha, beta, epilogue, out_dtype, out, False)

    return formula


@uncast
def traced(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, ta: bool, tb: bool,
    alpha: float, beta: float, epilogue: str, out_dtype: torch.dtype | None, out: Tensor | None,
    allow_tf32: bool | None = None,
) -> tuple[Tensor, Any]:  # fmt: skip
    """``gemm`` where ``torch.compile`` traces: aten's ops where they serve, else the ``gemmbridge::gemm`` op
    (``allow_tf32`` given for float32: the op, which honours it). Autocast is off for them (``uncast``)."""
    if a.device.type != "cuda" or (_aten_serves(a.dtype, epilogue, out_dtype, c, bias)
                                   and (allow_tf32 is None or a.dtype != torch.float32)):  # fmt: skip
        return _formula(a, b, c, bias, aux, ta, tb, alpha, beta, epilogue, out_dtype, out, True)
    d, extra = torch.ops.gemmbridge.gemm(a, b, c, bias, aux, ta, tb, alpha, beta, epilogue, out_dtype, allow_tf32)
    kind = epilogues.TABLE[epilogue]
    returns = kind.aux_out != "none" or kind.bias_grad != "none"  # else the op's extra is an empty placeholder
    return (d if out is None else out.copy_(d)), extra if returns else None
