"""``LoRALinear``, ``apply_lora`` by name pattern, and adapter-only checkpoints (safetensors)."""

from __future__ import annotations

import fnmatch
import functools
import math
import numbers
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .._optional import require
from ..errors import OptionError, ShapeError
from .functional import linear, lora_linear
from .modules import check_pattern, is_plain_linear, replace_child

ADAPTERS = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """``y = x · Wᵀ + b + (alpha / r) · (dropout(x) · Aᵀ) · Bᵀ`` with ``W`` ``(out, in)`` frozen.

    ``A`` ``(r, in)`` starts Kaiming-uniform and ``B`` ``(out, r)`` at zero, as in PEFT, so a new layer
    computes the frozen one. Forward and backward are ``gemmbridge.torch.lora_linear``: the base GEMM
    accumulates into the LoRA term, and nothing of ``x``'s size is kept but ``x`` (and a dropout mask).
    ``merge()`` folds ``(alpha / r) · B · A`` into ``W`` (the forward is then the frozen layer's alone);
    ``unmerge()`` takes it back out.

    Args:
        in_features, out_features: the frozen layer's sizes.
        r: the adapters' rank.
        alpha: LoRA's alpha; the scale is ``alpha / r``. Default: ``r`` (scale 1).
        dropout: dropout probability on the LoRA path's input while training. Default: 0.
        bias: the frozen layer has a bias. Default: True.
        adapter_dtype: the adapters' dtype (``torch.float32`` with half activations is PEFT's default);
            None: the frozen weight's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        adapter_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, alpha, dropout, adapter_dtype)

    @classmethod
    def from_linear(
        cls, module: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = None,
    ) -> LoRALinear:  # fmt: skip
        """A ``LoRALinear`` on ``module``'s weight and bias (shared, not copied; frozen)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._setup(module.weight, module.bias, r, alpha, dropout, adapter_dtype)
        return new

    def _setup(
        self, weight: Tensor, bias: Tensor | None, r: int, alpha: float | None, dropout: float,
        adapter_dtype: torch.dtype | None,
    ) -> None:  # fmt: skip
        alpha = check_options("LoRALinear", r, alpha, dropout, adapter_dtype)
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.scale = self.alpha / r
        self.merged = False
        self.weight = weight.requires_grad_(False)
        self.bias = None if bias is None else bias.requires_grad_(False)
        device, dtype = weight.device, adapter_dtype or weight.dtype
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, input: Tensor) -> Tensor:  # nn.Linear's argument name: a drop-in takes the same keywords
        if self.merged:
            return linear(input, self.weight, self.bias)
        return lora_linear(input, self.weight, self.bias, self.lora_a, self.lora_b, self.scale, self.dropout,
                           self.training)  # fmt: skip

    def delta_weight(self) -> Tensor:
        """``(alpha / r) · B · A`` in the widest of float32, W's dtype and the adapters' (float64 for a float64 W)."""
        dtype = functools.reduce(torch.promote_types, (self.weight.dtype, self.lora_a.dtype, self.lora_b.dtype))
        dtype = torch.promote_types(dtype, torch.float32)
        return (self.lora_b.detach().to(dtype) @ self.lora_a.detach().to(dtype)) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """``W += (alpha / r) · B · A``, rounded once to W's dtype; the forward is then the frozen layer's alone."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapters are merged already")
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= (alpha / r) · B · A`` (exact only up to W's rounding when W is a half type)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapters are not merged")
        delta = self.delta_weight()
        self.weight.copy_(self.weight.to(delta.dtype) - delta)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, merged={self.merged}")  # fmt: skip


def check_options(where: str, r: object, alpha: object, dropout: object, adapter_dtype: object) -> float:
    """LoRA's options checked, or an ``OptionError`` naming the one that is wrong; returns alpha (``r`` if None)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise OptionError(f"{where}: r {r!r} is not a positive integer")
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= float(dropout) < 1.0:
        raise OptionError(f"{where}: dropout {dropout!r} is not a number in [0, 1)")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise OptionError(f"{where}: the adapters' dtype {adapter_dtype!r} is not a floating-point torch.dtype")
    if alpha is None:
        return float(r)
    value = math.nan
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        try:
            value = float(alpha)
        except OverflowError:
            value = math.inf
    if not math.isfinite(value):
        raise OptionError(f"{where}: alpha {alpha!r} is not a finite number")
    return value


def apply_lora(
    model: nn.Module,
    patterns: str | Iterable[str],
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` (or gemmbridge ``Linear`` without activation) whose qualified name
    matches one of ``patterns`` (``fnmatch``, e.g. ``"*.q_proj"``) by a ``LoRALinear`` on the same weight and bias,
    and freeze every other parameter of ``model``, as PEFT does: only the adapters train. Each new layer keeps the
    replaced one's train/eval mode and hooks. ``dtype``: the adapters' (None: each weight's). Returns the names
    replaced; a pattern that matches no such layer is refused."""
    patterns = list(patterns) if isinstance(patterns, Iterable) and not isinstance(patterns, str) else [patterns]
    if not patterns:
        raise OptionError("apply_lora: no pattern given")
    for pattern in patterns:
        check_pattern("apply_lora", pattern)
    check_options("apply_lora", r, alpha, dropout, dtype)
    linears = [(name, module) for name, module in model.named_modules() if name and is_plain_linear(module)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name, _ in linears)]
    if unmatched:
        raise OptionError(f"apply_lora: no linear layer without activation of the model matches "
                          f"{', '.join(map(repr, unmatched))}")  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = []
    for name, module in linears:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            parent_name, _, child = name.rpartition(".")
            replace_child(
                model.get_submodule(parent_name), child, LoRALinear.from_linear(module, r, alpha, dropout, dtype)
            )
            replaced.append(name)
    return replaced


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters of every ``LoRALinear`` in ``model``, under their ``state_dict`` names."""
    return {
        f"{name}.{key}" if name else key: getattr(module, key)
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
        for key in ADAPTERS
    }


def _no_lora_layer(where: str, model: nn.Module, peft_way: str) -> OptionError:
    """The error for a model without ``LoRALinear`` layers; a PEFT model is pointed to PEFT's own checkpoints."""
    peft_layers = [name for name, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if peft_layers:
        return OptionError(f"{where}: the model has no gemmbridge LoRALinear layer; it is a PEFT model "
                           f"({peft_layers[0] or type(model).__qualname__} …), whose adapters PEFT saves and loads "
                           f"itself: {peft_way}")  # fmt: skip
    return OptionError(f"{where}: the model has no LoRALinear layer")


def save_adapters(model: nn.Module, path: str | Path) -> list[str]:
    """Save only the adapters of ``model``'s ``LoRALinear`` layers to a safetensors file; returns their names."""
    save_file = require("safetensors.torch", "lora", "save_adapters").save_file

    tensors = {name: t.detach().contiguous() for name, t in adapter_state_dict(model).items()}
    if not tensors:
        raise _no_lora_layer("save_adapters", model, "model.save_pretrained(directory)")
    save_file(tensors, str(path), metadata={"format": "gemmbridge-lora/1"})
    return sorted(tensors)


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | Path) -> list[str]:
    """Load adapters saved by ``save_adapters`` into ``model``'s ``LoRALinear`` layers (copied in place, cast to
    each adapter's dtype). The file's names and shapes must be exactly the model's adapters; a layer that is
    merged is refused (unmerge it first)."""
    load_file = require("safetensors.torch", "lora", "load_adapters").load_file

    own = adapter_state_dict(model)
    if not own:
        raise _no_lora_layer("load_adapters", model, "model.load_adapter(directory, adapter_name)")
    saved = load_file(str(path), device="cpu")
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise OptionError(f"load_adapters: {path} does not hold this model's adapters: missing {missing}, "
                          f"unexpected {unexpected}")  # fmt: skip
    for name, tensor in saved.items():
        if tensor.shape != own[name].shape:
            raise ShapeError(f"load_adapters: {name} is {tuple(tensor.shape)} in {path}, "
                             f"{tuple(own[name].shape)} in the model")  # fmt: skip
    merged = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if merged:
        raise OptionError(f"load_adapters: {', '.join(merged)} merged; unmerge() before loading adapters")
    for name, tensor in saved.items():
        own[name].copy_(tensor)
    return sorted(saved)
