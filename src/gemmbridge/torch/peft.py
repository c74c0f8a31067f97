"""The PEFT bridge: route a ``peft`` model's LoRA linear layers through ``gemmbridge.torch.lora_linear``.

``use_gemmbridge(model)`` gives each LoRA ``Linear`` it can serve a forward of its own (an instance
attribute over the class's ``forward``, picklable: ``torch.save`` / ``torch.load`` and ``copy.deepcopy`` keep
it): the model's modules, parameters, adapter names, scaling, dropout modules and ``state_dict`` stay PEFT's.
Per call, the fused op runs when exactly one active adapter of the layer is plain LoRA and the adapters are
neither disabled nor merged, with no extra arguments (``adapter_names`` …), and no hook would be bypassed: the
fused op reads the base layer's and the adapters' weights without calling those modules, so when one of them
carries a hook (forward or backward, a replaced ``forward`` such as accelerate's offload and ``device_map``
hooks, or a global module hook) PEFT's own forward runs and calls them. Layers it cannot serve — other adapter
types, DoRA and the other LoRA variants, ``lora_bias``, ``fan_in_fan_out``, a base layer that is not a plain
``nn.Linear`` (quantised ones), hooked ones — are left as they are and listed with the reason.
``undo_gemmbridge(model)`` puts PEFT's forward back. Needs the optional ``peft`` package
(``pip install gemmbridge[peft]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from torch import Tensor, nn

from .._optional import require
from .functional import lora_linear
from .modules import GLOBAL_HOOKS, hook_on


@dataclass
class BridgeReport:
    """What ``use_gemmbridge`` did: the layers routed through the fused op, and the others with the reason."""

    served: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class _FusedForward:
    """A bridged layer's ``forward``: PEFT's LoRA ``Linear.forward`` on the fused op where one plain LoRA adapter is
    active and no hook would be bypassed, else PEFT's own. The conditions are checked on every call (an adapter, DoRA
    say, or a hook added after ``use_gemmbridge`` may need PEFT's forward), reading the modules' own dictionaries:
    a few dictionary lookups, not ``nn.Module.__getattr__``'s. An object rather than a bound method, so that pickling
    a bridged model stores it by its class and ``torch.load`` restores it."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer = self.layer
        if not (args or kwargs or any(GLOBAL_HOOKS) or layer.disable_adapters or layer.merged):
            adapters = layer._modules["lora_A"]._modules
            active = [name for name in layer.active_adapters if name in adapters]
            base = layer._modules["base_layer"]
            if len(active) == 1 and _plain_linear_why_not(base) is None and _adapter_why_not(layer, active[0]) is None:
                name = active[0]
                dropout = layer._modules["lora_dropout"]._modules[name]
                p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
                weight, bias = base._parameters["weight"], base._parameters["bias"]
                lora_a = adapters[name]._parameters["weight"]
                lora_b = layer._modules["lora_B"]._modules[name]._parameters["weight"]
                return lora_linear(x, weight, bias, lora_a, lora_b, float(layer.scaling[name]), p, dropout.training)
        return type(layer).forward(layer, x, *args, **kwargs)


def _plain_linear_why_not(module: nn.Module) -> str | None:
    """Why the fused op cannot read ``module`` as a weight (and bias), or None: a plain ``nn.Linear`` without hooks."""
    if type(module) is not nn.Linear or "weight" not in module._parameters or "bias" not in module._parameters:
        return f"{type(module).__qualname__} is not a plain nn.Linear (quantised or wrapped)"
    hook = hook_on(module)
    return None if hook is None else f"{hook}, which only PEFT's forward runs (it calls the module)"


def _adapter_why_not(layer: Any, name: str) -> str | None:
    """Why the fused op cannot serve adapter ``name`` of this PEFT layer, or None when it can."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None or layer.use_dora.get(name):
        return f"adapter {name!r} is a LoRA variant ({type(variant).__name__}: DoRA or another)"
    lora_a, lora_b = layer._modules["lora_A"]._modules[name], layer._modules["lora_B"]._modules[name]
    for part, module in (("lora_A", lora_a), ("lora_B", lora_b)):
        reason = _plain_linear_why_not(module)
        if reason is not None:
            return f"adapter {name!r}'s {part}: {reason}"
    if lora_b._parameters["bias"] is not None:
        return f"adapter {name!r} has lora_bias"
    dropout = layer._modules["lora_dropout"]._modules[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"adapter {name!r} has dropout {type(dropout).__qualname__}"
    hook = hook_on(dropout)
    return None if hook is None else f"adapter {name!r}'s lora_dropout has {hook}"


def _why_not(module: Any, lora_linear_type: Any) -> str | None:
    """Why the bridge cannot serve this PEFT layer, or None when it can."""
    if type(module) is not lora_linear_type:
        return f"{type(module).__module__}.{type(module).__qualname__} is not peft's LoRA Linear"
    if "forward" in module.__dict__ and not _is_bridged(module):
        return "its forward is replaced already (an accelerate hook or another wrapper), which the bridge would undo"
    reason = _plain_linear_why_not(module.base_layer)
    if reason is not None:
        return f"base layer: {reason}"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (a Conv1D-style weight)"
    for name in module.lora_A:
        reason = _adapter_why_not(module, name)
        if reason:
            return reason
    return None


def _is_bridged(module: Any) -> bool:
    return isinstance(module.__dict__.get("forward"), _FusedForward)


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
            cast(Any, module).forward = _FusedForward(module)
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
