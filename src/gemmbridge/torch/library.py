"""gemmbridge's PyTorch operators: one custom op for what aten lacks, and the autograd Functions of the ops.

- ``gemmbridge::gemm`` (``torch.ops.gemmbridge.gemm``): one call of the full ``gemmbridge.matmul`` contract, the
  epilogue's extra output (aux or bias gradient) returned beside the result (an empty tensor when it has none).
  Registered with ``torch.library.define`` + ``impl`` + ``register_fake``, the low-level registration: a
  ``torch.library.custom_op`` wraps each call in Python layers that cost about 20 µs more per call inside a
  compiled graph on an H200 VM (``scripts/lane_probe.py``; docs/architecture.md). Compiled graphs call it for the
  GEMMs aten has no form of (fused activations saving their pre-activation, activation derivatives, bias
  gradients reduced in the GEMM, float32 results from half inputs); every other GEMM is aten's own op there. It
  is not differentiable: called on inputs that require grad with grad mode on, it refuses.
- ``_Linear``, ``_MLPUp`` + ``_MLPDown``, ``_LoRALinear``, ``_Matmul``: the ``autograd.Function`` of each
  differentiable op (forward and backward in ``functions.py``), run as they are in eager mode and traced by
  ``torch.compile`` (autograd stays outside any op).

Outputs never alias inputs; work goes on torch's current stream, results come from torch's caching allocator,
nothing synchronizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import epilogues
from ..arrays.torch import DTYPES, VIEW
from ..errors import OptionError
from ..problem import describe, names
from . import functions as f
from . import lane

LIBRARY = "gemmbridge"
_META = VIEW.meta

# -- gemmbridge::gemm ----------------------------------------------------------------------------------------

torch.library.define(
    f"{LIBRARY}::gemm",
    "(Tensor a, Tensor b, Tensor? c, Tensor? bias, Tensor? aux, bool transpose_a, bool transpose_b, float alpha, "
    "float beta, str epilogue, ScalarType? out_dtype, bool? allow_tf32=None) -> (Tensor, Tensor)",
)


def _gemm(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, transpose_a: bool,
    transpose_b: bool, alpha: float, beta: float, epilogue: str, out_dtype: torch.dtype | None,
    allow_tf32: bool | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``gemmbridge.matmul`` of these tensors as (result, the epilogue's aux or bias gradient)."""
    if a.device.type == "cuda" and allow_tf32 is None:  # the launch lane: the plan resolved once
        d, extra = lane.launch(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype)
    else:
        d, extra = f.direct_gemm(a, b, c, bias, aux, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype,
                                 allow_tf32)  # fmt: skip
    return d, a.new_empty((0,)) if extra is None else extra


torch.library.impl(f"{LIBRARY}::gemm", "CPU")(_gemm)
torch.library.impl(f"{LIBRARY}::gemm", "CUDA")(_gemm)


@torch.library.impl(f"{LIBRARY}::gemm", "Autograd")
def _gemm_autograd(a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None,
                   *options: Any) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Refuse inputs autograd would have to record; run the op below autograd otherwise."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, c, bias, aux)):
        raise OptionError(
            f"gemmbridge::gemm: {names(_META(a), _META(b)).removeprefix('matmul: ')} — inputs require grad and "
            "gemmbridge::gemm is not differentiable (it is the backward formulas' building block): call it under "
            "torch.no_grad(), or use gemmbridge.matmul / gemmbridge.torch for gradients"
        )
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.gemmbridge.gemm.default(a, b, c, bias, aux, *options)


@torch.library.register_fake(f"{LIBRARY}::gemm")
def _gemm_fake(
    a: Tensor, b: Tensor, c: Tensor | None, bias: Tensor | None, aux: Tensor | None, transpose_a: bool,
    transpose_b: bool, alpha: float, beta: float, epilogue: str, out_dtype: torch.dtype | None,
    allow_tf32: bool | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The outputs' shapes and dtypes as ``gemmbridge.problem.describe`` gives them (batches of ``a`` folded into
    the aux's rows, 1-D operands promoted and squeezed), with the same errors."""
    metas = [None if x is None else _META(x) for x in (c, bias, aux)]
    problem = describe(_META(a), _META(b), c=metas[0], bias=metas[1], aux=metas[2], transpose_a=transpose_a,
                       transpose_b=transpose_b, epilogue=epilogue, out_dtype=out_dtype)  # fmt: skip
    result = DTYPES[problem.result_dtype]
    if problem.aux_shape is not None and epilogues.TABLE[epilogue].aux_out != "none":
        extra = a.new_empty(problem.aux_shape, dtype=DTYPES[problem.aux_dtype])
    elif problem.bias_grad_length:
        extra = a.new_empty((problem.bias_grad_length,), dtype=result)
    else:
        extra = a.new_empty((0,))
    return a.new_empty(problem.out_shape, dtype=result), extra


# -- autograd Functions ----------------------------------------------------------------------------------------


class _Function(torch.autograd.Function):
    """What every op's Function shares. Written with ``ctx`` in ``forward`` (no ``setup_context``): a Function with
    ``setup_context`` binds its arguments through ``inspect.signature`` on every ``apply``, tens to hundreds of µs
    of host time. functorch transforms are refused before ``apply`` (``functional.no_transforms``)."""


class _Linear(_Function):
    """``act(x · Wᵀ + b)``: relu's derivative reads the output, gelu's the pre-activation its GEMM saved."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Any, activation: str, compute_dtype: Any) -> Tensor:
        y, saved = f.linear_forward(x, weight, bias, activation, compute_dtype, activation == "gelu")
        ctx.activation, ctx.compute_dtype = activation, compute_dtype
        ctx.save_for_backward(x, weight, bias, y if activation == "relu" else None, saved)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:
        x, weight, bias, y, saved = ctx.saved_tensors
        grads = f.linear_backward(dy, x, weight, bias, y, saved, ctx.activation, ctx.compute_dtype,
                                  ctx.needs_input_grad[:3])  # fmt: skip
        return (*grads, None, None)


class _MLPUp(_Function):
    """fc1 of the MLP: ``h = act(x · W1ᵀ + b1)``, with aux (non-differentiable) for the down node's backward. Its
    backward receives, in h's slot, the gradient of the pre-activation (``functions`` MLP notes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, b1: Any, activation: str, compute_dtype: Any) -> tuple:
        h, aux = f.mlp_up(x, w1, b1, activation, compute_dtype, True)
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(x, w1, b1)
        ctx.mark_non_differentiable(aux)
        return h, aux

    @staticmethod
    def backward(ctx: Any, dp1: Tensor, _aux: Any) -> tuple:
        x, w1, b1 = ctx.saved_tensors
        return (*f.mlp_up_backward(dp1, x, w1, b1, ctx.compute_dtype, ctx.needs_input_grad[:3]), None, None)


class _MLPDown(_Function):
    """fc2 of the MLP: ``y = h · W2ᵀ + b2``; its backward applies the activation's derivative (from aux)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, aux: Tensor, w2: Tensor, b2: Any, lead: tuple, activation: str,
                compute_dtype: Any) -> Tensor:  # fmt: skip
        ctx.activation, ctx.compute_dtype = activation, compute_dtype
        ctx.save_for_backward(h, aux, w2, b2)
        return f.mlp_down(h, w2, b2, lead, compute_dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:
        h, aux, w2, b2 = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        dp1, grad_w2, grad_b2 = f.mlp_down_backward(dy, h, aux, w2, b2, ctx.activation, ctx.compute_dtype, needs)
        return dp1, None, grad_w2, grad_b2, None, None, None


class _LoRALinear(_Function):
    """``x · Wᵀ + b + s · ((x ⊙ m) · Aᵀ / keep) · Bᵀ``; ``xs = (s / keep) · (x ⊙ m) · Aᵀ`` kept for the backward, and
    the mask or the seed it is drawn from."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Any, lora_a: Tensor, lora_b: Tensor, mask: Any, seed: Any,
                scale: float, keep: float, compute_dtype: Any) -> Tensor:  # fmt: skip
        y, xs = f.lora_forward(x, weight, bias, lora_a, lora_b, mask, seed, scale, keep, compute_dtype)
        ctx.scale, ctx.keep, ctx.compute_dtype = scale, keep, compute_dtype
        ctx.save_for_backward(x, weight, bias, lora_a, lora_b, mask, seed, xs)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:
        x, weight, bias, lora_a, lora_b, mask, seed, xs = ctx.saved_tensors
        grads = f.lora_backward(dy, x, weight, bias, lora_a, lora_b, mask, seed, xs, ctx.scale, ctx.keep,
                                ctx.compute_dtype, ctx.needs_input_grad[:5])  # fmt: skip
        return (*grads, None, None, None, None, None)


class _Matmul(_Function):
    """``act(alpha · op(a) @ op(b) + beta · c + bias)``, differentiable in every tensor; gelu's pre-activation kept."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, c: Any, bias: Any, ta: bool, tb: bool, alpha: float, beta: float,
                activation: str, out_dtype: Any, tf32: Any) -> Tensor:  # fmt: skip
        d, saved = f.matmul_forward(a, b, c, bias, ta, tb, alpha, beta, activation, out_dtype, True, tf32)
        ctx.transpose_a, ctx.transpose_b, ctx.alpha, ctx.beta, ctx.activation = ta, tb, alpha, beta, activation
        ctx.tf32 = tf32
        ctx.save_for_backward(a, b, c, bias, d, saved)
        return d

    @staticmethod
    def backward(ctx: Any, dd: Tensor) -> tuple:
        a, b, c, bias, d, saved = ctx.saved_tensors
        grads = f.matmul_backward(dd, a, b, c, bias, d, saved, ctx.transpose_a, ctx.transpose_b, ctx.alpha, ctx.beta,
                                  ctx.activation, ctx.tf32, ctx.needs_input_grad[:4])  # fmt: skip
        return (*grads, None, None, None, None, None, None, None)
