"""Forward and backward of the differentiable ops, written once for eager mode and ``torch.compile``.

Every GEMM of ``linear``, ``mlp`` and ``lora_linear`` goes through the launch lane (``lane.gemm``: resolved once
per layout, then launched; under ``torch.compile`` aten's ops or the ``gemmbridge::gemm`` op). The differentiable
``gemmbridge.matmul`` keeps the public contract (broadcast batches, ``allow_tf32`` per call) through
``direct_gemm``. Transposes are flags, never materialised. Results are allocated once in their final shape and
the GEMMs write into their 2-D view: an op's output is a tensor of its own, never a view (in-place use after it
works as after ``F.linear``). ``compute_dtype`` is the autocast dtype (or None): inputs are cast to it as
``F.linear`` does under autocast, and each gradient is returned in its input's dtype — weight gradients of
float32 parameters come straight out of the GEMM in float32 (``out_dtype``), never rounded to the half type first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..arrays.torch import VIEW
from ..arrays.torch import records as requires_grad  # noqa: F401 (the ops' "must autograd record this call")
from ..errors import OptionError
from ..plan import call
from . import lora_kernels
from .lane import HALF, gemm, traced, uncast

_gelu_backward = torch.ops.aten.gelu_backward
_threshold_backward = torch.ops.aten.threshold_backward
_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active
_is_batched = torch._C._functorch.is_legacy_batchedtensor


@uncast
def direct_gemm(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, transpose_a: bool,
    transpose_b: bool, alpha: float, beta: float, epilogue: str, out_dtype: torch.dtype | None,
    allow_tf32: bool | None = None,
) -> tuple[Tensor, Any]:  # fmt: skip
    """``gemmbridge.matmul`` as ``(d, extra)`` (extra: the aux or bias gradient, or None): the whole contract, for
    the differentiable ``matmul``; where ``torch.compile`` traces, ``lane.traced``. Its callers (an op's forward
    or backward, ``gemmbridge::gemm``) hand over checked options and run where autograd records nothing, so the
    call goes straight to the plan cache (``plan.call``), not through ``gemmbridge.matmul``'s checks again."""
    if _is_compiling():
        return traced(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype, None,
                      allow_tf32)  # fmt: skip
    result = call(VIEW, a, b, c, bias, None, aux, None, (transpose_a, transpose_b, epilogue, out_dtype), alpha, beta,
                  allow_tf32)  # fmt: skip
    return result if isinstance(result, tuple) else (result, None)


def no_transforms(op: str) -> None:
    """OptionError under a functorch transform (``torch.func.grad``, ``vmap``, ``jacrev``, batched gradients): the
    ops launch their GEMMs on concrete tensors, and their Functions skip ``setup_context`` (each ``apply`` would
    bind its arguments through ``inspect.signature``: tens of µs)."""
    if not _is_compiling() and _transforms_active():
        raise _transform_error(op)


def _transform_error(op: str) -> OptionError:
    return OptionError(
        f"gemmbridge.torch.{op}: torch.func transforms (grad, vjp, vmap, jacrev, jacfwd, and batched gradients "
        "such as autograd.grad(is_grads_batched=True) or gradcheck(check_batched_grad=True)) are not supported "
        "by gemmbridge's ops, which launch their GEMMs on concrete tensors; use torch.nn.functional.linear / "
        "torch.matmul there, or torch.autograd.grad for gradients"
    )


def no_double_backward(dy: Tensor) -> None:
    """The checks of every backward: no double backward (create_graph=True), no functorch transform or batched
    gradients (``autograd.grad(is_grads_batched=True)``) over it."""
    if _is_compiling():  # a traced backward: neither can happen there
        return
    if torch.is_grad_enabled():
        raise RuntimeError(
            "gemmbridge: double backward (create_graph=True) is not supported by gemmbridge's ops; "
            "use torch.nn.functional.linear / torch.matmul where second derivatives are needed"
        )
    if _is_batched(dy):
        raise _transform_error("backward")
    no_transforms("backward")


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


def _cast_bias(x: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return None if x is None else _cast(x, dtype)


def _grad_dtype(param: Tensor, compute: torch.dtype) -> torch.dtype | None:
    """out_dtype for a weight gradient: float32 for a float32 parameter fed to half GEMMs."""
    return torch.float32 if param.dtype == torch.float32 and compute in HALF else None


def _as(x: Tensor, like: Tensor) -> Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


def row_count(x: Tensor) -> int:
    """Rows of ``x`` as a matrix: the product of all but its last dim (symbolic sizes allowed)."""
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    return rows


def _matrix(x: Tensor) -> Tensor:
    """``x`` as its ``rows × features`` matrix (a view where the layout allows, else a copy)."""
    return x.reshape(row_count(x), x.shape[-1])


def _result(x: Tensor, features: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A new result in ``x``'s leading shape with ``features`` columns, and its 2-D view the GEMMs write."""
    y = x.new_empty((*x.shape[:-1], features), dtype=dtype)
    return y, y.view(row_count(x), features)


# -- Linear: y = act(x · Wᵀ + b) ---------------------------------------------------------------------------


def _activated(
    xr: Tensor, w: Tensor, b: Tensor | None, activation: str, save: bool, out: Tensor | None = None
) -> tuple[Tensor, Any]:
    """``act(xr · wᵀ + b)`` and, when ``save``, the ``{activation}_aux`` its GEMM writes (None where nothing is
    saved or the GEMM has no rows or columns: no epilogue runs then, and the backward does without it)."""
    fused = save and xr.shape[0] > 0 and w.shape[0] > 0
    return gemm(xr, w, None, b, None, False, True, 1.0, 0.0, activation + ("_aux" if fused else ""), None, out)


def linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, compute_dtype: torch.dtype | None, save: bool
) -> tuple[Tensor, Any]:
    """(y, saved): ``saved`` is the gelu pre-activation (``gelu_aux``'s, padded rows on CUDA) when ``save``."""
    w, b = _cast(weight, compute_dtype), _cast_bias(bias, compute_dtype)
    xc = _cast(x, compute_dtype)
    y, y2 = _result(x, w.shape[0], xc.dtype)
    saved = _activated(_matrix(xc), w, b, activation, save and activation == "gelu", y2)[1]
    return y, saved


def _weight_grads(
    dp: Tensor, xc: Tensor, weight: Tensor, bias: Tensor | None, needs_w: bool, needs_b: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``dW = dpᵀ · xc`` and ``db = Σ_rows dp``; with both asked, ``db`` is reduced inside the GEMM (``bgrad_a``)
    where every dim is ≥ 1 and the reduced one, the rows, ≥ 2 (as the d* epilogues need: K = 1 was never run
    on cuBLASLt, and one row costs nothing to sum)."""
    compute = dp.dtype
    grad_w = grad_b = None
    fused = needs_w and needs_b and min(*dp.shape, xc.shape[1]) > 0 and dp.shape[0] >= 2
    if needs_w:
        epilogue = "bgrad_a" if fused else "none"
        grad_w, reduced = gemm(dp, xc, None, None, None, True, False, 1.0, 0.0, epilogue, _grad_dtype(weight, compute))
        grad_w, grad_b = _as(grad_w, weight), reduced if fused else None
    if needs_b:
        assert bias is not None
        if grad_b is None:
            grad_b = dp.sum(0, dtype=torch.float32 if compute in HALF else None)
        grad_b = _as(grad_b, bias)
    return grad_w, grad_b


def _input_grad(dp: Tensor, weight: Tensor, x: Tensor, compute_dtype: torch.dtype | None) -> Tensor:
    """``dx = dp · W`` in ``x``'s shape and dtype."""
    dx, dx2 = _result(x, weight.shape[1], dp.dtype)
    gemm(dp, _cast(weight, compute_dtype), None, None, None, False, False, 1.0, 0.0, "none", None, dx2)
    return _as(dx, x)


def linear_backward(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor | None, saved: Tensor | None,
    activation: str, compute_dtype: torch.dtype | None, needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients of x, weight, bias. The bias gradient is reduced inside the weight-gradient GEMM."""
    no_double_backward(dy)
    out = weight.shape[0]
    xc = _matrix(_cast(x, compute_dtype))
    dp = dy.reshape(xc.shape[0], out)
    if activation == "gelu" and saved is not None:
        dp = _gelu_backward(dp, saved[:, :out], approximate="tanh")
    elif activation == "relu":
        assert y is not None
        dp = _threshold_backward(dp, y.reshape(dp.shape), 0)
    grad_w, grad_b = _weight_grads(dp, xc, weight, bias, needs[1], needs[2])
    grad_x = _input_grad(dp, weight, x, compute_dtype) if needs[0] else None
    return grad_x, grad_w, grad_b


# -- MLP: y = act(x · W1ᵀ + b1) · W2ᵀ + b2 -------------------------------------------------------------------
#
# Two autograd nodes, as two nn.Linear make: fc1 ("up") and fc2 ("down"). The down node's backward reads dy once
# for fc2's weight gradient and, through the activation's derivative fused into the GEMM, hands the up node the
# gradient of fc1's pre-activation (in h's slot: h is the MLP's own intermediate). dy, h and aux are freed when
# the down node is done, as eager frees them, so the backward peaks no higher than two nn.Linear's.


def mlp_up(
    x: Tensor, w1: Tensor, b1: Tensor | None, activation: str, compute_dtype: torch.dtype | None, save: bool
) -> tuple[Tensor, Tensor]:
    """(h, aux): ``h = act(x · W1ᵀ + b1)`` as a rows × hidden matrix, and what the activation's derivative reads
    when ``save`` — the ``*_aux`` epilogue's on CUDA; on the CPU gelu's pre-activation, and for relu nothing (an
    empty tensor: the backward reads h)."""
    w1c, b1c = _cast(w1, compute_dtype), _cast_bias(b1, compute_dtype)
    xc = _matrix(_cast(x, compute_dtype))
    fused = save and (activation == "gelu" or x.device.type == "cuda")
    h, aux = _activated(xc, w1c, b1c, activation, fused)
    if aux is None:  # no epilogue ran (or relu on the CPU): gelu's derivative reads an unwritten one of h's shape
        aux = h.new_empty(h.shape if activation == "gelu" and save else (0,))
    return h, aux


def mlp_down(
    h: Tensor, w2: Tensor, b2: Tensor | None, lead: tuple[int, ...], compute_dtype: torch.dtype | None
) -> Tensor:
    """``y = h · W2ᵀ + b2`` in the input's leading shape ``lead``."""
    y = h.new_empty((*lead, w2.shape[0]))
    gemm(h, _cast(w2, compute_dtype), None, _cast_bias(b2, compute_dtype), None, False, True, 1.0, 0.0, "none", None,
         y.view(h.shape[0], w2.shape[0]))  # fmt: skip
    return y


def mlp_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str,
    compute_dtype: torch.dtype | None,
) -> Tensor:  # fmt: skip
    """``act(x · W1ᵀ + b1) · W2ᵀ + b2`` where nothing is kept for a backward."""
    h = mlp_up(x, w1, b1, activation, compute_dtype, False)[0]
    return mlp_down(h, w2, b2, tuple(x.shape[:-1]), compute_dtype)


def mlp_down_backward(
    dy: Tensor, h: Tensor, aux: Tensor, w2: Tensor, b2: Tensor | None, activation: str,
    compute_dtype: torch.dtype | None, needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """(gradient of fc1's pre-activation, dW2, db2): fc2's weight gradient with its bias gradient (``bgrad_a``),
    and fc2's input gradient with the activation's derivative fused (``dgelu`` / ``drelu``)."""
    no_double_backward(dy)
    dy2 = dy.reshape(h.shape[0], w2.shape[0]).to(h.dtype)
    hidden = h.shape[1]
    grad_w2, grad_b2 = _weight_grads(dy2, h, w2, b2, needs[1], needs[2] and b2 is not None)
    if not needs[0]:
        return None, grad_w2, grad_b2
    w2c = _cast(w2, compute_dtype)
    # the derivative fused, fc1's bias gradient a separate sum: cuBLASLt's DGELU_BGRAD took 2.41 ms where DGELU
    # and a sum took 1.86 (H200, T = 8192, d = 4096, h = 16384, bf16; benchmarks/epilogue_costs.py)
    if min(*dy2.shape, hidden) > 0 and w2.shape[0] >= 2 and aux.numel() > 0:  # the d* epilogues need K ≥ 2
        dp1 = gemm(dy2, w2c, None, None, aux, False, False, 1.0, 0.0, f"d{activation}", None)[0]
    else:  # the derivative as its own op
        dh = gemm(dy2, w2c, None, None, None, False, False, 1.0, 0.0, "none", None)[0]
        dp1 = (_gelu_backward(dh, aux[:, :hidden], approximate="tanh") if activation == "gelu"
               else _threshold_backward(dh, h, 0))  # fmt: skip
    return dp1, grad_w2, grad_b2


def mlp_up_backward(
    dp1: Tensor, x: Tensor, w1: Tensor, b1: Tensor | None, compute_dtype: torch.dtype | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """(dx, dW1, db1) from the gradient of fc1's pre-activation: ``db1 = Σ_rows dp1``, ``dW1 = dp1ᵀ · x``,
    ``dx = dp1 · W1``."""
    no_double_backward(dp1)
    xc = _matrix(_cast(x, compute_dtype))
    compute = dp1.dtype
    grad_b1 = None
    if needs[2] and b1 is not None:
        grad_b1 = _as(dp1.sum(0, dtype=torch.float32 if compute in HALF else None), b1)
    grad_w1 = None
    if needs[1]:
        grad_w1 = _as(gemm(dp1, xc, None, None, None, True, False, 1.0, 0.0, "none", _grad_dtype(w1, compute))[0], w1)
    grad_x = _input_grad(dp1, w1, x, compute_dtype) if needs[0] else None
    return grad_x, grad_w1, grad_b1


# -- LoRA linear: y = x · Wᵀ + b + s · (drop(x) · Aᵀ) · Bᵀ, W frozen -------------------------------------------


def _dropped(xc: Tensor, mask: Tensor | None) -> Tensor:
    """``x ⊙ m`` (the 1 / keep factor is the GEMMs' alpha), or ``x`` itself without a mask."""
    return xc if mask is None else xc * mask.reshape(xc.shape)


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, mask: Tensor | None,
    seed: Tensor | None, scale: float, keep: float, compute_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(y, xs) in three GEMMs: ``xs = (s / keep) · (x ⊙ m) · Aᵀ``; ``y = xs · Bᵀ``; ``y += x · Wᵀ + b`` (beta = 1).

    The scale rides on the narrow ``xs`` (rows × r), so the wide GEMMs run plain. The dropout mask is ``mask`` (bool,
    ``x``'s shape) or, with ``seed``, drawn inside the kernel that reads x (``lora_kernels``; 1 / keep is then the
    mask's exact keep rate). The adapters are cast to the GEMMs' dtype (x's, or the autocast dtype) — never x to
    the adapters'. ``xs`` is what the backward needs besides x and the mask (or its seed).
    """
    xc = _cast(x, compute_dtype)
    xr = _matrix(xc)
    w, b = _cast(weight, compute_dtype), _cast_bias(bias, compute_dtype)
    a, lb = _as(lora_a, xc), _as(lora_b, xc)
    if seed is not None:
        xs = lora_kernels.masked(xr, a, None, False, True, scale / lora_kernels.kept(keep), 0.0, "a", keep, seed)
    else:
        xs = gemm(_dropped(xr, mask), a, None, None, None, False, True, scale / keep, 0.0, "none", None)[0]
    y, y2 = _result(x, w.shape[0], xc.dtype)
    gemm(xs, lb, None, None, None, False, True, 1.0, 0.0, "none", None, y2)
    gemm(xr, w, y2, b, None, False, True, 1.0, 1.0, "none", None, y2)
    return y, xs


def lora_backward(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    mask: Tensor | None, seed: Tensor | None, xs: Tensor, scale: float, keep: float,
    compute_dtype: torch.dtype | None, needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of x, W, b, A, B: ``dB = dyᵀ · xs``; ``gs = s · dy · B``; ``dA = gsᵀ · (x ⊙ m) / keep``;
    ``dx = (gs · A / keep) ⊙ m + dy · W`` (the last GEMM accumulates with beta = 1). W and b get gradients only
    when they require them (``dW = dyᵀ · x``, ``db = Σ_rows dy``, one GEMM). dA, dB come out of the GEMM in the
    adapters' dtype (``out_dtype`` float32 for float32 adapters fed half activations). With ``seed``, the mask is
    drawn again inside the kernels that read x and write dx; gs and dB may come from one read of dy
    (``lora_kernels.dy_once``)."""
    no_double_backward(dy)
    xr = _matrix(_cast(x, compute_dtype))
    dyc = dy.reshape(xr.shape[0], weight.shape[0])
    a, lb = _as(lora_a, xr), _as(lora_b, xr)
    compute = xr.dtype
    inverse = 1.0 / (keep if seed is None else lora_kernels.kept(keep))
    grads: list[Tensor | None] = [None] * 5
    grads[1], grads[2] = _weight_grads(dyc, xr, weight, bias, needs[1], needs[2] and bias is not None)
    both = needs[4] and (needs[0] or needs[3]) and dyc.is_cuda
    found = lora_kernels.dy_once(dyc, lb, xs, scale, _grad_dtype(lora_b, compute)) if both else None
    if found is not None:
        gs, grads[4] = found[0], _as(found[1], lora_b)
    elif needs[4]:
        db = gemm(dyc, xs, None, None, None, True, False, 1.0, 0.0, "none", _grad_dtype(lora_b, compute))[0]
        grads[4] = _as(db, lora_b)
    if needs[0] or needs[3]:
        if found is None:
            gs = gemm(dyc, lb, None, None, None, False, False, scale, 0.0, "none", None)[0]
        if needs[3]:
            da_dtype = _grad_dtype(lora_a, compute)
            if seed is not None:
                da = lora_kernels.masked(gs, xr, None, True, False, inverse, 0.0, "b", keep, seed, da_dtype)
            else:
                da = gemm(gs, _dropped(xr, mask), None, None, None, True, False, inverse, 0.0, "none", da_dtype)[0]
            grads[3] = _as(da, lora_a)
        if needs[0]:
            dx, dx2 = _result(x, xr.shape[1], compute)
            if seed is not None:
                lora_kernels.masked(gs, a, None, False, False, inverse, 0.0, "d", keep, seed, None, dx2)
            else:
                gemm(gs, a, None, None, None, False, False, inverse, 0.0, "none", None, dx2)
                if mask is not None:
                    dx2.mul_(mask.reshape(dx2.shape))
            gemm(dyc, _cast(weight, compute_dtype), dx2, None, None, False, False, 1.0, 1.0, "none", None, dx2)
            grads[0] = _as(dx, x)
    return tuple(grads)


# -- matmul: act(alpha · op(a) @ op(b) + beta · c + bias), a and b at least 2-D ----------------------------


def matmul_forward(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, transpose_a: bool, transpose_b: bool,
    alpha: float, beta: float, activation: str, out_dtype: torch.dtype | None, save: bool, allow_tf32: bool | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d, saved): for gelu, ``saved`` is the pre-activation (2-D: the padded aux of ``gelu_aux``)."""
    args = (a, b, c, bias, None, transpose_a, transpose_b, alpha, beta)
    if activation != "gelu" or not save:
        return direct_gemm(*args, activation, out_dtype, allow_tf32)[0], a.new_empty(0)
    m, n = a.shape[-1 if transpose_a else -2], b.shape[-2 if transpose_b else -1]
    if a.dim() == 2 and b.dim() == 2 and m > 0 and n > 0:  # the fused form saves the pre-activation itself
        return direct_gemm(*args, "gelu_aux", out_dtype, allow_tf32)
    pre = direct_gemm(*args, "none", out_dtype, allow_tf32)[0]
    return torch.nn.functional.gelu(pre, approximate="tanh"), pre


def matmul_backward(
    dd: Tensor, a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, d: Tensor, saved: Tensor,
    transpose_a: bool, transpose_b: bool, alpha: float, beta: float, activation: str, allow_tf32: bool | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of a, b, c, bias: GEMMs with transpose flags, batch dims a or b broadcast summed away."""
    no_double_backward(dd)
    dp = dd
    if activation == "gelu":
        dp = _gelu_backward(dp, saved[..., : d.shape[-1]], approximate="tanh")
    elif activation == "relu":
        dp = _threshold_backward(dp, d, 0)
    dpi = _as(dp, a)  # a float32 result of half inputs: the input gradients are half, like the inputs
    grads: list[Tensor | None] = [None] * 4
    if needs[0]:  # d op(a) = alpha · dp @ op(b)ᵀ
        if transpose_a:
            ga = direct_gemm(b, dpi, None, None, None, transpose_b, True, alpha, 0.0, "none", None, allow_tf32)[0]
        else:
            ga = direct_gemm(dpi, b, None, None, None, False, not transpose_b, alpha, 0.0, "none", None, allow_tf32)[0]
        grads[0] = ga.sum_to_size(a.shape)
    if needs[1]:  # d op(b) = alpha · op(a)ᵀ @ dp
        if transpose_b:
            gb_ = direct_gemm(dpi, a, None, None, None, True, transpose_a, alpha, 0.0, "none", None, allow_tf32)[0]
        else:
            gb_ = direct_gemm(a, dpi, None, None, None, not transpose_a, False, alpha, 0.0, "none", None, allow_tf32)[0]
        grads[1] = gb_.sum_to_size(b.shape)
    if needs[2] and c is not None:
        grads[2] = (dp * beta).sum_to_size(c.shape)
    if needs[3] and bias is not None:
        grads[3] = dp.reshape(-1, dp.shape[-1]).sum(0).to(bias.dtype)
    return tuple(grads)
