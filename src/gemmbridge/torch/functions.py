"""Forward and backward of the differentiable ops, written once for the eager path and the custom ops.

The forward functions run inside an op's implementation or an eager ``autograd.Function``, never
traced, and call ``direct_gemm``. The backward functions are traced by ``torch.compile``: every GEMM
in them goes through ``gemm(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue,
out_dtype) -> (d, extra)``, which is ``direct_gemm`` in eager mode and ``torch.ops.gemmbridge.gemm``
where ``torch.compile`` traces. Transposes are flags, never materialised. ``compute_dtype`` is the
autocast dtype (or None): inputs are cast to it as ``F.linear`` does under autocast, and each
gradient is returned in its input's dtype — weight gradients of float32 parameters come straight
out of the GEMM in float32 (``out_dtype``), never rounded to the half type first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import epilogues
from ..ops import matmul

Gemm = Callable[..., tuple[Tensor, Tensor]]
HALF = (torch.float16, torch.bfloat16)
_gelu_backward = torch.ops.aten.gelu_backward
_threshold_backward = torch.ops.aten.threshold_backward


def direct_gemm(
    a: Tensor,
    b: Tensor,
    c: Tensor | None,
    bias: Tensor | None,
    aux: Tensor | None,
    transpose_a: bool,
    transpose_b: bool,
    alpha: float,
    beta: float,
    epilogue: str,
    out_dtype: torch.dtype | None,
    allow_tf32: bool | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``gemmbridge.matmul`` as ``(d, extra)``: extra is the aux or bias gradient, or an empty tensor.

    ``out`` (forward functions only, never traced): a new tensor to write the result into.
    """
    if torch.is_grad_enabled():  # only ever reached from inside an op: never record autograd here
        with torch.no_grad():
            return direct_gemm(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype,
                               allow_tf32, out)  # fmt: skip
    kind = epilogues.TABLE[epilogue]
    result = matmul(a, b, c=c, bias=bias, aux=aux if kind.aux_in != "none" else None, transpose_a=transpose_a,
                    transpose_b=transpose_b, alpha=alpha, beta=beta, epilogue=epilogue, out_dtype=out_dtype,
                    allow_tf32=allow_tf32, out=out)  # fmt: skip
    if isinstance(result, tuple):
        return result
    return result, a.new_empty((0,))


def no_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "gemmbridge: double backward (create_graph=True) is not supported by gemmbridge's ops; "
            "use torch.nn.functional.linear / torch.matmul where second derivatives are needed"
        )


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


def _cast_bias(x: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return None if x is None else _cast(x, dtype)


def _grad_dtype(param: Tensor, compute: torch.dtype) -> torch.dtype | None:
    """out_dtype for a weight gradient: float32 for a float32 parameter fed to half GEMMs."""
    return torch.float32 if param.dtype == torch.float32 and compute in HALF else None


def _as(x: Tensor, like: Tensor) -> Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


# -- Linear: y = act(x · Wᵀ + b) ---------------------------------------------------------------------------


def _rows(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``x`` cast for the GEMM, at least 2-D, and contiguous, so that its batch dims fold into the GEMM's rows:
    the result then comes back in ``x``'s leading shape as a tensor of its own, not a view (autograd and
    FSDP2 treat a view output as aliasing)."""
    x = _cast(x, dtype)
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x if x.dim() == 2 or x.is_contiguous() else x.contiguous()


def _like_rows_of(t: Tensor, x: Tensor) -> Tensor:
    """``t``, computed on ``_rows(x)``, back in ``x``'s leading shape: a vector when ``x`` is one."""
    return t.view(t.shape[-1]) if x.dim() == 1 else t


def row_count(x: Tensor) -> int:
    """Rows of ``x`` as a matrix: the product of all but its last dim (symbolic sizes allowed)."""
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    return rows


def _matrix(x: Tensor) -> Tensor:
    """``x`` as its ``rows × features`` matrix (a reshape that also holds when either is 0)."""
    return x.reshape(row_count(x), x.shape[-1])


def empty_aux(x: Tensor, features: int, activation: str, dtype: torch.dtype) -> Tensor:
    """An unwritten ``{activation}_aux`` for ``x``'s rows and ``features`` columns: relu's bit mask in bytes,
    gelu's pre-activation in ``dtype``."""
    shape = epilogues.aux_shape(f"{activation}_aux", row_count(x), features)
    return x.new_empty(shape, dtype=torch.uint8 if activation == "relu" else dtype)


def _activated(xr: Tensor, w: Tensor, b: Tensor | None, activation: str, save: bool) -> tuple[Tensor, Tensor]:
    """``act(xr · wᵀ + b)`` and, when ``save``, the ``{activation}_aux`` its GEMM writes — or, where the GEMM
    has no rows or columns (no epilogue runs), an unwritten one of the same shape; else an empty tensor."""
    fused = save and row_count(xr) > 0 and w.shape[0] > 0
    y, aux = direct_gemm(xr, w, None, b, None, False, True, 1.0, 0.0, activation + ("_aux" if fused else ""), None)
    if save and not fused:
        aux = empty_aux(xr, w.shape[0], activation, xr.dtype)
    return y, aux


def linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, compute_dtype: torch.dtype | None, save: bool
) -> tuple[Tensor, Tensor]:
    """(y, saved): ``saved`` is the gelu pre-activation (padded rows) when ``save``, else empty."""
    w, b = _cast(weight, compute_dtype), _cast_bias(bias, compute_dtype)
    y, saved = _activated(_rows(x, compute_dtype), w, b, activation, save and activation == "gelu")
    return _like_rows_of(y, x), saved


def _weight_grads(
    gemm: Gemm, dp: Tensor, xc: Tensor, weight: Tensor, bias: Tensor | None, needs_w: bool, needs_b: bool
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


def linear_backward(
    gemm: Gemm, dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, saved: Tensor, activation: str,
    compute_dtype: torch.dtype | None, needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients of x, weight, bias. The bias gradient is reduced inside the weight-gradient GEMM."""
    no_double_backward()
    out = weight.shape[0]
    xc = _cast(_matrix(x), compute_dtype)
    dp = dy.reshape(xc.shape[0], out)
    if activation == "gelu":
        dp = _gelu_backward(dp, saved[:, :out], approximate="tanh")
    elif activation == "relu":
        dp = _threshold_backward(dp, y.reshape(dp.shape), 0)
    grad_w, grad_b = _weight_grads(gemm, dp, xc, weight, bias, needs[1], needs[2])
    grad_x = None
    if needs[0]:
        grad_x = gemm(dp, _cast(weight, compute_dtype), None, None, None, False, False, 1.0, 0.0, "none", None)[0]
        grad_x = _as(grad_x.view(x.shape), x)
    return grad_x, grad_w, grad_b


# -- MLP: y = act(x · W1ᵀ + b1) · W2ᵀ + b2 -------------------------------------------------------------------


def mlp_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str,
    compute_dtype: torch.dtype | None, save: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, h, aux): fc1 saves its pre-activation in aux (``*_aux`` epilogue) when ``save``."""
    w1c, b1c = _cast(w1, compute_dtype), _cast_bias(b1, compute_dtype)
    w2c, b2c = _cast(w2, compute_dtype), _cast_bias(b2, compute_dtype)
    h, aux = _activated(_rows(x, compute_dtype), w1c, b1c, activation, save)
    y = direct_gemm(h, w2c, None, b2c, None, False, True, 1.0, 0.0, "none", None)[0]
    return _like_rows_of(y, x), _like_rows_of(h, x), aux


def mlp_backward(
    gemm: Gemm, dy: Tensor, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, h: Tensor,
    aux: Tensor, activation: str, compute_dtype: torch.dtype | None, needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of x, w1, b1, w2, b2 in four GEMMs: fc2's weight gradient with its bias gradient (``bgrad_a``);
    fc2's input gradient with the activation's derivative (``dgelu`` / ``drelu``), fc1's bias gradient summed
    from it; fc1's weight and input gradients."""
    no_double_backward()
    xc = _cast(_matrix(x), compute_dtype)
    w1c, w2c = _cast(w1, compute_dtype), _cast(w2, compute_dtype)
    h = _matrix(h)
    dy2 = dy.reshape(h.shape[0], w2.shape[0]).to(h.dtype)
    compute, hidden = h.dtype, h.shape[1]
    grads: list[Tensor | None] = [None] * 5
    grads[3], grads[4] = _weight_grads(gemm, dy2, h, w2, b2, needs[3], needs[4] and b2 is not None)
    if needs[0] or needs[1] or needs[2]:
        # the derivative fused, the bias gradient a separate sum: cuBLASLt's DGELU_BGRAD took 2.41 ms where DGELU
        # and a sum took 1.86 (H200, T = 8192, d = 4096, h = 16384, bf16; benchmarks/epilogue_costs.py)
        if min(*dy2.shape, hidden) > 0 and w2.shape[0] >= 2:
            dp1 = gemm(dy2, w2c, None, None, aux, False, False, 1.0, 0.0, f"d{activation}", None)[0]
        else:  # the d* epilogues need M, N ≥ 1 and K ≥ 2: the derivative as its own op
            dh = gemm(dy2, w2c, None, None, None, False, False, 1.0, 0.0, "none", None)[0]
            dp1 = (_gelu_backward(dh, aux[:, :hidden], approximate="tanh") if activation == "gelu"
                   else _threshold_backward(dh, h, 0))  # fmt: skip
        if needs[2] and b1 is not None:
            grads[2] = _as(dp1.sum(0, dtype=torch.float32 if compute in HALF else None), b1)
        if needs[1]:
            dw1 = gemm(dp1, xc, None, None, None, True, False, 1.0, 0.0, "none", _grad_dtype(w1, compute))[0]
            grads[1] = _as(dw1, w1)
        if needs[0]:
            dx = gemm(dp1, w1c, None, None, None, False, False, 1.0, 0.0, "none", None)[0]
            grads[0] = _as(dx.view(x.shape), x)
    return tuple(grads)


# -- LoRA linear: y = x · Wᵀ + b + s · (drop(x) · Aᵀ) · Bᵀ, W frozen -------------------------------------------


def _dropped(xc: Tensor, mask: Tensor | None) -> Tensor:
    """``x ⊙ m`` (the 1 / keep factor is the GEMMs' alpha), or ``x`` itself without a mask."""
    return xc if mask is None else xc * mask.reshape(xc.shape)


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, mask: Tensor | None,
    scale: float, keep: float, compute_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(y, xa) in three GEMMs: ``xa = (x ⊙ m) · Aᵀ / keep``; ``y = s · xa · Bᵀ``; ``y += x · Wᵀ + b`` (beta = 1).

    The adapters are cast to the GEMMs' dtype (x's, or the autocast dtype) — never x to the adapters'.
    ``xa`` (rows × r) is what the backward needs besides x and the mask.
    """
    xc = _rows(x, compute_dtype)
    w, b = _cast(weight, compute_dtype), _cast_bias(bias, compute_dtype)
    a, lb = _as(lora_a, xc), _as(lora_b, xc)
    xa = direct_gemm(_matrix(_dropped(xc, mask)), a, None, None, None, False, True, 1.0 / keep, 0.0, "none", None)[0]
    y = direct_gemm(xa, lb, None, None, None, False, True, scale, 0.0, "none", None)[0]
    y = y.view(*xc.shape[:-1], lb.shape[0])
    y = direct_gemm(xc, w, y, b, None, False, True, 1.0, 1.0, "none", None, None, y)[0]
    return _like_rows_of(y, x), xa


def lora_backward(
    gemm: Gemm, dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    mask: Tensor | None, xa: Tensor, scale: float, keep: float, compute_dtype: torch.dtype | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of x, W, b, A, B: ``g = dy · B``; ``dB = s · dyᵀ · xa``; ``dA = (s / keep) · gᵀ · (x ⊙ m)``;
    ``dx = ((s / keep) · g · A) ⊙ m + dy · W`` (the last GEMM accumulates with beta = 1). W and b get gradients
    only when they require them (``dW = dyᵀ · x``, ``db = Σ_rows dy``, one GEMM). dA, dB come out of the GEMM in
    the adapters' dtype (``out_dtype`` float32 for float32 adapters fed half activations)."""
    no_double_backward()
    xc = _cast(_matrix(x), compute_dtype)
    dyc = dy.reshape(xc.shape[0], weight.shape[0])
    a, lb = _as(lora_a, xc), _as(lora_b, xc)
    compute, alpha = xc.dtype, scale / keep
    grads: list[Tensor | None] = [None] * 5
    grads[1], grads[2] = _weight_grads(gemm, dyc, xc, weight, bias, needs[1], needs[2] and bias is not None)
    if needs[4]:
        db = gemm(dyc, xa, None, None, None, True, False, scale, 0.0, "none", _grad_dtype(lora_b, compute))[0]
        grads[4] = _as(db, lora_b)
    if needs[0] or needs[3]:
        g = gemm(dyc, lb, None, None, None, False, False, 1.0, 0.0, "none", None)[0]
        if needs[3]:
            da = gemm(g, _dropped(xc, mask), None, None, None, True, False, alpha, 0.0, "none",
                      _grad_dtype(lora_a, compute))[0]  # fmt: skip
            grads[3] = _as(da, lora_a)
        if needs[0]:
            dxa = gemm(g, a, None, None, None, False, False, alpha, 0.0, "none", None)[0]
            dxa = _dropped(dxa, mask)
            dx = gemm(dyc, _cast(weight, compute_dtype), dxa, None, None, False, False, 1.0, 1.0, "none", None)[0]
            grads[0] = _as(dx.view(x.shape), x)
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
    gemm: Gemm, dd: Tensor, a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, d: Tensor, saved: Tensor,
    transpose_a: bool, transpose_b: bool, alpha: float, beta: float, activation: str, allow_tf32: bool | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of a, b, c, bias: GEMMs with transpose flags, batch dims a or b broadcast summed away."""
    no_double_backward()
    dp = dd
    if activation == "gelu":
        dp = _gelu_backward(dp, saved[..., : d.shape[-1]], approximate="tanh")
    elif activation == "relu":
        dp = _threshold_backward(dp, d, 0)
    dpi = _as(dp, a)  # a float32 result of half inputs: the input gradients are half, like the inputs
    grads: list[Tensor | None] = [None] * 4
    if needs[0]:  # d op(a) = alpha · dp @ op(b)ᵀ
        if transpose_a:
            ga = gemm(b, dpi, None, None, None, transpose_b, True, alpha, 0.0, "none", None, allow_tf32)[0]
        else:
            ga = gemm(dpi, b, None, None, None, False, not transpose_b, alpha, 0.0, "none", None, allow_tf32)[0]
        grads[0] = ga.sum_to_size(a.shape)
    if needs[1]:  # d op(b) = alpha · op(a)ᵀ @ dp
        if transpose_b:
            gb_ = gemm(dpi, a, None, None, None, True, transpose_a, alpha, 0.0, "none", None, allow_tf32)[0]
        else:
            gb_ = gemm(a, dpi, None, None, None, not transpose_a, False, alpha, 0.0, "none", None, allow_tf32)[0]
        grads[1] = gb_.sum_to_size(b.shape)
    if needs[2] and c is not None:
        grads[2] = (dp * beta).sum_to_size(c.shape)
    if needs[3] and bias is not None:
        grads[3] = dp.reshape(-1, dp.shape[-1]).sum(0).to(bias.dtype)
    return tuple(grads)


def requires_grad(*tensors: Any) -> bool:
    """True when autograd must record a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
