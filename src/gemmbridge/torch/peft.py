"""The PEFT bridge: route a ``peft`` model's LoRA linear layers through ``gemmbridge.torch.lora_linear``.

``use_gemmbridge(model)`` gives each LoRA ``Linear`` it can serve a forward of its own (an instance
attribute over the class's ``forward``): the model's modules, parameters, adapter names, scaling, dropout
modules and ``state_dict`` stay PEFT's. Per call, the fused op runs when exactly one active adapter of the
layer is plain LoRA and the adapters are neither disabled nor merged, with no extra arguments
(``adapter_names`` …); otherwise PEFT's own forward runs. Layers it cannot serve — other adapter types,
DoRA and the other LoRA variants, ``lora_bias``, ``fan_in_fan_out``, a base layer that is not a plain
``nn.Linear`` (quantised ones) — are left as they are and listed with the reason. ``undo_gemmbridge(model)``
puts PEFT's forward back. Needs the optional ``peft`` package (``pip install gemmbridge[peft]``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, cast

from torch import Tensor, nn

from .._optional import require
from .functional import lora_linear


@dataclass
class BridgeReport:
    """What ``use_gemmbridge`` did: the layers routed through the fused op, and the others with the reason."""

    served: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _fused_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's LoRA ``Linear.forward`` on the fused op where one plain LoRA adapter is active, else PEFT's own.
    The active adapter is checked on every call: one added after ``use_gemmbridge`` (DoRA, say) may not be plain."""
    active = [name for name in self.active_adapters if name in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or _adapter_why_not(self, active[0]):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    base, dropout = self.base_layer, self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       float(self.scaling[name]), p, dropout.training)  # fmt: skip


def _adapter_why_not(module: Any, name: str) -> str | None:
    """Why the fused op cannot serve adapter ``name`` of this PEFT layer, or None when it can."""
    variant = getattr(module, "lora_variant", {}).get(name)
    if variant is not None or module.use_dora.get(name):
        return f"adapter {name!r} is a LoRA variant ({type(variant).__name__}: DoRA or another)"
    if type(module.lora_A[name]) is not nn.Linear or type(module.lora_B[name]) is not nn.Linear:
        return f"adapter {name!r} is not a pair of nn.Linear"
    if module.lora_B[name].bias is not None:
        return f"adapter {name!r} has lora_bias"
    if not isinstance(module.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"adapter {name!r} has dropout {type(module.lora_dropout[name]).__qualname__}"
    return None


def _why_not(module: Any, lora_linear_type: Any) -> str | None:
    """Why the bridge cannot serve this PEFT layer, or None when it can."""
    if type(module) is not lora_linear_type:
        return f"{type(module).__module__}.{type(module).__qualname__} is not peft's LoRA Linear"
    base = module.base_layer
    if type(base) is not nn.Linear:
        return f"base layer {type(base).__qualname__} is not a plain nn.Linear (quantised or wrapped)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (a Conv1D-style weight)"
    for name in module.lora_A:
        reason = _adapter_why_not(module, name)
        if reason:
            return reason
    return None


def _is_bridged(module: Any) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_forward


def use_gemmbridge(model: nn.Module) -> BridgeReport:
    """Route ``model``'s (a ``PeftModel``, ``LoraModel`` or any module holding PEFT LoRA layers) LoRA linear layers
    through the fused op, in place; returns which layers are served and which are not, and why."""
    PeftLoraLinear = require("peft.tuners.lora.layer", "peft", "use_gemmbridge").Linear
    BaseTunerLayer = require("peft.tuners.tuners_utils", "peft", "use_gemmbridge").BaseTunerLayer

    report = BridgeReport()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        reason = _why_not(module, PeftLoraLinear)
        if reason is not None:
            report.skipped[name] = reason
            continue
        if not _is_bridged(module):
            cast(Any, module).forward = types.MethodType(_fused_forward, module)
        report.served.append(name)
    return report


def undo_gemmbridge(model: nn.Module) -> list[str]:
    """Give every layer ``use_gemmbridge`` routed PEFT's own forward back; returns their names."""
    undone = []
    for name, module in model.named_modules():
        if _is_bridged(module):
            del module.forward
            undone.append(name)
    return undone
