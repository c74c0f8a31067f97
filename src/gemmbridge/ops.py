"""``matmul``: the cached wrapper over ``Plan`` — validate the options, find the call's plan, run it."""

from __future__ import annotations

from typing import Any

from .arrays import BY_TYPE, view_for
from .plan import PLAN_CACHE_SIZE, PLANS, call, check_flag, check_scalar, check_tf32, same_framework

__all__ = ["PLAN_CACHE_SIZE", "cache_size", "clear_cache", "matmul"]


def cache_size() -> int:
    """Number of plans in the process-wide cache (shared by every thread)."""
    return len(PLANS.plans)


def clear_cache() -> None:
    """Drop every cached plan and the vendor objects no other reference keeps (not while capturing a graph)."""
    PLANS.clear()


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
    aux: Any = None,
    bias_grad: Any = None,
    out_dtype: Any = None,
    allow_tf32: bool | None = None,
) -> Any:
    """``D = epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` in the caller's framework.

    Follows numpy ``matmul`` semantics (1-D operands promoted then squeezed, batch dims
    broadcast). ``op(x)`` swaps the last two dims of ``x`` when ``transpose_x`` is set. ``c``
    (optional) has the result's shape (its batch dims may broadcast) and is scaled by ``beta``;
    ``bias`` has shape ``(N,)`` and is added to every row. ``epilogue`` is one of
    ``gemmbridge.epilogues.NAMES``: ``"none"``, ``"relu"``, ``"gelu"`` (tanh approximation), the
    training forms that save the pre-activation in ``aux`` (``"relu_aux"``, ``"gelu_aux"``), apply
    an activation's derivative from it (``"drelu"``, ``"dgelu"``) and reduce a bias gradient
    (``"drelu_bgrad"``, ``"dgelu_bgrad"``, ``"bgrad_a"``, ``"bgrad_b"``); those return
    ``(d, aux)`` or ``(d, bias_grad)``, allocating what is not passed. ``out`` receives the result
    in place and may be ``c`` itself. ``out_dtype="float32"`` asks float16/bfloat16 inputs for a
    float32 result (``c``, ``bias``, ``out`` then are float32 too). ``allow_tf32`` (float32 on
    CUDA): ``None`` follows the framework's setting.
    """
    view = BY_TYPE.get(type(a)) or view_for(a, "a")
    if (
        type(b) is not type(a)
        or (c is not None and type(c) is not type(a))
        or (bias is not None and type(bias) is not type(a))
        or (out is not None and type(out) is not type(a))
        or aux is not None
        or bias_grad is not None
    ):
        same_framework(view, a, b, c=c, bias=bias, out=out, aux=aux, bias_grad=bias_grad)
    layer = view.layer
    if layer is not None and layer.takes(a, b, c, bias):  # autograd must record it, or torch.compile traces it
        return layer(a, b, transpose_a=transpose_a, transpose_b=transpose_b, c=c, alpha=alpha, beta=beta, bias=bias,
                     epilogue=epilogue, out_dtype=out_dtype, allow_tf32=allow_tf32, out=out, aux=aux,
                     bias_grad=bias_grad)  # fmt: skip
    if type(transpose_a) is not bool:
        transpose_a = check_flag(view, a, b, "transpose_a", transpose_a)
    if type(transpose_b) is not bool:
        transpose_b = check_flag(view, a, b, "transpose_b", transpose_b)
    if type(alpha) is not float:
        alpha = check_scalar(view, a, b, "alpha", alpha)
    if type(beta) is not float:
        beta = check_scalar(view, a, b, "beta", beta)
    if allow_tf32 is not None and type(allow_tf32) is not bool:
        allow_tf32 = check_tf32(view, a, b, allow_tf32)
    options = (transpose_a, transpose_b, epilogue, out_dtype)
    return call(view, a, b, c, bias, out, aux, bias_grad, options, alpha, beta, allow_tf32)
