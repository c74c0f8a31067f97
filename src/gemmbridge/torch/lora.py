"""``LoRALinear``, ``apply_lora`` by name pattern, and adapter-only checkpoints (safetensors)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .._optional import require
from ..errors import OptionError, ShapeError
from .functional import linear, lora_linear
from .modules import Linear

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
        if not (isinstance(r, int) and r >= 1):
            raise OptionError(f"LoRALinear: r {r!r} is not a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise OptionError(f"LoRALinear: dropout {dropout!r} is not in [0, 1)")
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.dropout = r, float(r if alpha is None else alpha), float(dropout)
        self.scale = self.alpha / r
        self.merged = False
        self.weight = weight.requires_grad_(False)
        self.bias = None if bias is None else bias.requires_grad_(False)
        device, dtype = weight.device, adapter_dtype or weight.dtype
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scale, self.dropout,
                           self.training)  # fmt: skip

    def delta_weight(self) -> Tensor:
        """``(alpha / r) · B · A`` in float32 (or float64 for float64 adapters)."""
        dtype = torch.float64 if self.lora_a.dtype == torch.float64 else torch.float32
        return (self.lora_b.detach().to(dtype) @ self.lora_a.detach().to(dtype)) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """``W += (alpha / r) · B · A``, rounded once to W's dtype; the forward is then the frozen layer's alone."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapters are merged already")
        self.weight.copy_(self.weight.to(self.delta_weight().dtype) + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= (alpha / r) · B · A`` (exact only up to W's rounding when W is a half type)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapters are not merged")
        self.weight.copy_(self.weight.to(self.delta_weight().dtype) - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, merged={self.merged}")  # fmt: skip


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a gemmbridge ``Linear`` without activation, not a subclass (``MultiheadAttention``'s
    ``out_proj`` is one, and reads its weight without calling it)."""
    return type(module) is nn.Linear or (type(module) is Linear and module.activation == "none")


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
    and freeze every other parameter of ``model``, as PEFT does: only the adapters train. ``dtype``: the adapters'
    (None: each weight's). Returns the names replaced; a pattern that matches no such layer is refused."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    linears = [(name, module) for name, module in model.named_modules() if _plain_linear(module)]
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
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRALinear.from_linear(module, r, alpha, dropout, dtype))
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


def save_adapters(model: nn.Module, path: str | Path) -> list[str]:
    """Save only the adapters of ``model``'s ``LoRALinear`` layers to a safetensors file; returns their names."""
    save_file = require("safetensors.torch", "lora", "save_adapters").save_file

    tensors = {name: t.detach().contiguous() for name, t in adapter_state_dict(model).items()}
    if not tensors:
        raise OptionError("save_adapters: the model has no LoRALinear layer")
    save_file(tensors, str(path), metadata={"format": "gemmbridge-lora/1"})
    return sorted(tensors)


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | Path) -> list[str]:
    """Load adapters saved by ``save_adapters`` into ``model``'s ``LoRALinear`` layers (copied in place, cast to
    each adapter's dtype). The file's names and shapes must be exactly the model's adapters; a layer that is
    merged is refused (unmerge it first)."""
    load_file = require("safetensors.torch", "lora", "load_adapters").load_file

    own = adapter_state_dict(model)
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
