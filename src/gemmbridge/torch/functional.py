"""Differentiable functions on torch tensors: ``matmul``, ``linear``, ``mlp``, ``lora_linear``.

Each checks its operands, then picks its path once per call: no autograd needed (grad mode off, or no input
requires grad) → the forward alone; otherwise the op's ``autograd.Function`` — in eager mode and under
``torch.compile`` alike (dynamo traces the Function; its GEMMs become aten's ops or ``gemmbridge::gemm``, so
``fullgraph=True`` holds in training, ``no_grad`` and ``inference_mode``). Under ``torch.autocast``, ``linear``,
``mlp`` and ``lora_linear`` cast their inputs to the autocast dtype as ``F.linear`` does (float64 stays float64, as
autocast leaves it), and gradients come back in each input's own dtype; ``matmul`` casts nothing (gemmbridge never
casts silently: pass ``out_dtype`` or cast the inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import epilogues
from ..arrays.torch import DTYPES, VIEW
from ..errors import OperandTypeError, OptionError, ShapeError
from ..ops import matmul as plain
from ..plan import check_flag, check_scalar, check_tf32
from ..problem import dtype_name
from . import functions as f
from . import library, lora_kernels

ACTIVATIONS = ("none", "relu", "gelu")
_is_compiling = torch.compiler.is_compiling


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``x``'s device type, or None (also for float64 ``x``, which autocast
    leaves alone)."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return None


def _check_activation(activation: str, allowed: tuple[str, ...] = ACTIVATIONS) -> None:
    if activation not in allowed:
        raise OptionError(f"gemmbridge.torch: activation {activation!r} is not one of {', '.join(allowed)}")


def _check_tensors(op: str, **tensors: Any) -> None:
    """OperandTypeError for an operand that is not a torch tensor (None allowed where the op takes none)."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, Tensor):
            kind = type(t)
            raise OperandTypeError(
                f"gemmbridge.torch.{op}: {name} is a {kind.__module__}.{kind.__qualname__}, not a torch.Tensor "
                "(gemmbridge.matmul takes NumPy, CuPy and JAX arrays)"
            )


def _shapes(**tensors: Any) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items() if t is not None)


def _check_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, name: str = "weight") -> None:
    """``weight`` ``(out, in)`` with ``in`` x's last dim, ``bias`` ``(out,)``, or a ``ShapeError`` naming them."""
    if (
        weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]
        or (bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]))
    ):  # fmt: skip
        raise ShapeError(
            f"gemmbridge.torch.{op}: {_shapes(x=x, **{name: weight}, bias=bias)} — expected {name} (out, in) with "
            "in = x's last dim" + (", bias (out,)" if bias is not None else "")
        )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none") -> Tensor:
    """``y = act(x · Wᵀ + b)``; ``weight`` is ``(out, in)`` as in ``nn.Linear``; act is none, relu or gelu.

    GELU is the tanh approximation (what cuBLASLt computes), i.e. ``nn.GELU(approximate="tanh")``.
    """
    f.no_transforms("linear")
    _check_activation(activation)
    _check_tensors("linear", x=x, weight=weight, bias=bias)
    _check_linear("linear", x, weight, bias)
    compute = autocast_dtype(x)
    if not f.requires_grad(x, weight, bias):
        return f.linear_forward(x, weight, bias, activation, compute, False)[0]
    return library._Linear.apply(x, weight, bias, activation, compute)


def mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str = "gelu") -> Tensor:
    """``y = act(x · W1ᵀ + b1) · W2ᵀ + b2``: forward in two GEMMs, backward in four (``functions``' MLP notes)."""
    f.no_transforms("mlp")
    _check_activation(activation, ("relu", "gelu"))
    _check_tensors("mlp", x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    _check_linear("mlp", x, w1, b1, "w1")
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0] or (b2 is not None and tuple(b2.shape) != (w2.shape[0],)):
        raise ShapeError(f"gemmbridge.torch.mlp: {_shapes(w1=w1, w2=w2, b2=b2)} — expected w2 (out, hidden) with "
                         "hidden = w1's rows, b2 (out,)")  # fmt: skip
    compute = autocast_dtype(x)
    if not f.requires_grad(x, w1, b1, w2, b2):
        return f.mlp_forward(x, w1, b1, w2, b2, activation, compute)
    h, aux = library._MLPUp.apply(x, w1, b1, activation, compute)
    return library._MLPDown.apply(h, aux, w2, b2, tuple(x.shape[:-1]), activation, compute)


def _check_lora_shapes(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor) -> None:
    """W ``(out, in)``, A ``(r, in)``, B ``(out, r)`` with ``in`` x's last dim, or a ``ShapeError`` naming all four."""
    if (
        weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2 or x.dim() < 1
        or weight.shape[1] != x.shape[-1] or lora_a.shape[1] != x.shape[-1]
        or lora_b.shape[0] != weight.shape[0] or lora_b.shape[1] != lora_a.shape[0]
        or (bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]))
    ):  # fmt: skip
        raise ShapeError(
            f"gemmbridge.torch.lora_linear: x is {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a "
            f"{tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
            + ("" if bias is None else f", bias {tuple(bias.shape)}")
            + " — expected weight (out, in), lora_a (r, in), lora_b (out, r) with in = x's last dim, bias (out,)"
        )


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """``y = x · Wᵀ + b + s · (dropout(x) · Aᵀ) · Bᵀ``; ``W`` ``(out, in)``, ``A`` ``(r, in)``, ``B`` ``(out, r)``.

    Three GEMMs forward, the base one accumulating into the LoRA term (beta = 1, the bias in its epilogue);
    nothing of size ``x`` is kept beyond ``x`` itself. Adapters of another dtype than the activations (float32
    adapters, bfloat16 ``x``) are cast to the activations' dtype for the GEMMs; their gradients come back in their
    own dtype. Dropout (probability ``dropout``, only when ``training``) applies to the LoRA path's input, as in
    PEFT: with half activations on a GPU of compute capability 9.0 or later (eager), its mask is drawn inside the
    kernels that read x from a seed torch's CUDA generator draws — nothing of it is stored, x ⊙ m never written;
    elsewhere (the CPU, float32, ``torch.compile``) it is torch's bernoulli draw, kept as a bool mask (one byte per
    element of ``x``) for the backward. ``dropout_mask`` (bool, ``x``'s shape, True = kept) fixes the mask instead
    of drawing one (ignored, like dropout itself, when not ``training``).
    """
    f.no_transforms("lora_linear")
    _check_tensors("lora_linear", x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, mask=dropout_mask)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise OptionError(f"gemmbridge.torch.lora_linear: dropout {dropout!r} is not in [0, 1)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -1e30 < scale < 1e30:
        raise OptionError(f"gemmbridge.torch.lora_linear: scale {scale!r} is not a finite number")
    _check_lora_shapes(x, weight, bias, lora_a, lora_b)
    mask = seed = None
    keep = 1.0
    compute = autocast_dtype(x)
    if training and (dropout_mask is not None or dropout > 0.0):
        keep = 1.0 - dropout
        mask = dropout_mask
        if mask is not None and (mask.shape != x.shape or mask.dtype != torch.bool or mask.device != x.device):
            raise OptionError(
                f"gemmbridge.torch.lora_linear: dropout_mask is {tuple(mask.shape)} {mask.dtype} on {mask.device}; "
                f"it must be torch.bool of x's shape {tuple(x.shape)} on {x.device}"
            )
        if mask is None and not _is_compiling() and lora_kernels.eligible(x, compute or x.dtype):
            seed = lora_kernels.seed_for(x)  # the mask drawn inside the kernels that read x
        elif mask is None:
            mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep)
    args = (x, weight, bias, lora_a, lora_b, mask, seed, float(scale), keep, compute)
    if not f.requires_grad(x, weight, bias, lora_a, lora_b):
        return f.lora_forward(*args)[0]
    return library._LoRALinear.apply(*args)


def matmul(
    a: Tensor,
    b: Tensor,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    c: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: Tensor | None = None,
    epilogue: str = "none",
    out_dtype: Any = None,
    allow_tf32: bool | None = None,
    **outputs: Any,
) -> Any:
    """``gemmbridge.matmul`` of torch tensors where autograd records it or ``torch.compile`` traces it: differentiable
    in ``a``, ``b``, ``c`` and ``bias``.

    Recorded, ``epilogue`` is none, relu or gelu, and outputs written in place (``out``, ``aux``, ``bias_grad``) are
    refused, as ``torch.mm(out=...)`` refuses them. Where nothing records, the whole contract holds (traced: aten's
    GEMM, or the ``gemmbridge::gemm`` op for what only gemmbridge does; eager: ``gemmbridge.matmul`` itself).
    """
    f.no_transforms("matmul")
    _check_tensors("matmul", a=a, b=b, c=c, bias=bias, **outputs)
    if type(transpose_a) is not bool:  # the checks' fast paths: this runs per call of gemmbridge.matmul's training
        transpose_a = check_flag(VIEW, a, b, "transpose_a", transpose_a)
    if type(transpose_b) is not bool:
        transpose_b = check_flag(VIEW, a, b, "transpose_b", transpose_b)
    if allow_tf32 is not None and type(allow_tf32) is not bool:
        allow_tf32 = check_tf32(VIEW, a, b, allow_tf32)
    alpha = alpha if type(alpha) is float else check_scalar(VIEW, a, b, "alpha", alpha)
    beta = beta if type(beta) is float else check_scalar(VIEW, a, b, "beta", beta)
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        out_dtype = DTYPES.get(dtype_name(out_dtype), out_dtype)
    recorded = f.requires_grad(a, b, c, bias)
    if not recorded and not _is_compiling():  # gemmbridge.torch.matmul called directly, nothing to record
        return plain(a, b, transpose_a=transpose_a, transpose_b=transpose_b, c=c, alpha=alpha, beta=beta, bias=bias,
                     epilogue=epilogue, out_dtype=out_dtype, allow_tf32=allow_tf32, **outputs)  # fmt: skip
    given = [name for name, value in outputs.items() if value is not None]
    if recorded and (given or epilogue not in ACTIVATIONS):
        from ..problem import names

        operands = names(VIEW.meta(a), VIEW.meta(b))
        if given:
            raise OptionError(
                f"{operands} — {', '.join(given)} given while inputs require grad: autograd cannot record a write "
                "into a given tensor (call it under torch.no_grad(), or use the returned result)"
            )
        raise OptionError(
            f"{operands} — epilogue {epilogue!r} with inputs that require grad: autograd records none, relu and "
            "gelu; the training epilogues are the building blocks of backward passes: call them under torch.no_grad()"
        )
    if not recorded and (given or epilogue not in ACTIVATIONS):
        d, extra = torch.ops.gemmbridge.gemm(a, b, c, bias, outputs.get("aux"), transpose_a, transpose_b, alpha, beta,
                                             epilogue, out_dtype, allow_tf32)  # fmt: skip
        return _written(d, extra, epilogue, outputs)
    for name, flag, x in (("transpose_a", transpose_a, a), ("transpose_b", transpose_b, b)):
        if flag and x.dim() == 1:  # as gemmbridge.matmul refuses it: a 1-D operand has nothing to transpose
            raise OptionError(f"matmul: a is {tuple(a.shape)}, b is {tuple(b.shape)} — {name} needs a matrix, "
                              f"{name[-1]} is 1-D")  # fmt: skip
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    c2 = c
    if c is not None and (a.dim() == 1 or b.dim() == 1):  # c has the squeezed result's shape: put the dims back
        c2 = c.unsqueeze(-1) if b.dim() == 1 else c
        c2 = c2.unsqueeze(-2) if a.dim() == 1 else c2
    args = (a2, b2, c2, bias, transpose_a, transpose_b, alpha, beta, epilogue, out_dtype)
    if recorded:
        d = library._Matmul.apply(*args, allow_tf32)
    else:
        d = f.matmul_forward(*args, False, allow_tf32)[0]
    if b.dim() == 1:
        d = d.squeeze(-1)
    if a.dim() == 1:
        d = d.squeeze(-2) if b.dim() > 1 else d.squeeze(-1)
    return d


def _written(d: Tensor, extra: Tensor, epilogue: str, outputs: dict[str, Any]) -> Any:
    """A traced ``gemmbridge.matmul`` that nothing records, with given outputs or a training epilogue, from the
    ``gemmbridge::gemm`` op's ``(d, extra)`` (the contract's own shapes and aux forms): the results written into
    what was given, returned as ``gemmbridge.matmul`` returns them."""
    out = outputs.get("out")
    if out is not None:
        d = out.copy_(d)
    kind = epilogues.TABLE[epilogue]
    if kind.aux_out != "none":
        aux = outputs.get("aux")
        return d, extra if aux is None else aux.copy_(extra)
    if kind.bias_grad != "none":
        bias_grad = outputs.get("bias_grad")
        return d, extra if bias_grad is None else bias_grad.copy_(extra)
    return d
