"""``Linear`` and ``MLP`` modules, and ``convert_linears`` for models built from ``nn.Linear``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules import module as torch_module

from ..errors import OptionError
from .functional import ACTIVATIONS, linear, mlp


class Linear(nn.Linear):
    """``y = act(x · Wᵀ + b)``, with ``W`` of shape ``(out_features, in_features)``; a drop-in ``nn.Linear``.

    The same parameters (``weight``, ``bias``), initialisation and ``state_dict`` keys as ``nn.Linear``;
    forward and backward run on the vendor GEMM, the bias and activation fused into it, the bias
    gradient reduced inside the weight-gradient GEMM.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias. Default: True.
        activation: ``"none"`` (default), ``"relu"`` or ``"gelu"``. GELU is the tanh approximation that
            cuBLASLt computes, ``nn.GELU(approximate="tanh")``, not ``nn.GELU()``'s exact erf form.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise OptionError(f"Linear: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_linear(cls, module: nn.Linear, activation: str = "none") -> Linear:
        """A ``Linear`` sharing ``module``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.activation = module.in_features, module.out_features, activation
        new.weight = module.weight
        new.bias = module.bias
        if activation not in ACTIVATIONS:
            raise OptionError(f"Linear: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        return new

    def forward(self, input: Tensor) -> Tensor:  # nn.Linear's argument name: a drop-in takes the same keywords
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        extra = "" if self.activation == "none" else f", activation={self.activation!r}"
        return super().extra_repr() + extra


class MLP(nn.Module):
    """``y = act(x · W1ᵀ + b1) · W2ᵀ + b2``: two linear layers around an activation, fused for training.

    Forward: fc1 with its bias and activation fused, saving the pre-activation (``*_aux`` epilogue),
    then fc2 with its bias. Backward: four GEMMs — fc2's weight gradient reducing its bias gradient,
    fc2's input gradient applying the activation's derivative (fc1's bias gradient is then one sum:
    cuBLASLt's fused ``DGELU_BGRAD`` measured slower than ``DGELU`` and a sum), and fc1's weight and
    input gradients. Parameters ``fc1.weight`` ``(hidden, in)``, ``fc1.bias``,
    ``fc2.weight`` ``(out, hidden)``, ``fc2.bias``, as two ``nn.Linear`` would have them.

    The fused op reads fc1's and fc2's weights without calling them. Where that would change what runs — fc1 or fc2
    carries a hook, or is not a plain linear layer (a ``LoRALinear`` that ``apply_lora`` put there) — the forward
    calls them as modules instead: ``fc2(act(fc1(x)))``.

    Args:
        in_features: size of each input sample.
        hidden_features: width of the hidden layer.
        out_features: size of each output sample. Default: ``in_features``.
        bias: learn the two additive biases. Default: True.
        activation: ``"gelu"`` (default, the tanh approximation) or ``"relu"``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool = True,
        activation: str = "gelu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise OptionError(f"MLP: activation {activation!r} is not relu or gelu")
        self.activation = activation
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:  # the name nn.Linear and nn.Sequential take
        fc1, fc2 = self.fc1, self.fc2
        if bypassable(fc1) and bypassable(fc2):
            return mlp(input, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.activation)
        return fc2(TORCH_ACTIVATIONS[self.activation](fc1(input)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


TORCH_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}

# torch's global module hooks (``register_module_forward_hook`` …), which run around every module's call
GLOBAL_HOOKS = (
    torch_module._global_forward_pre_hooks,
    torch_module._global_forward_hooks,
    torch_module._global_backward_pre_hooks,
    torch_module._global_backward_hooks,
)


def hook_on(module: nn.Module) -> str | None:
    """The hook that runs when ``module`` is called (which reading its weights would bypass), or None."""
    if module._forward_pre_hooks or module._forward_hooks:
        return "forward hooks"
    if module._backward_pre_hooks or module._backward_hooks:
        return "backward hooks"
    forward = module.__dict__.get("forward")
    if forward is not None and getattr(forward, "__func__", None) is not type(module).forward:
        return "a replaced forward (an accelerate hook: offload, device_map; or another wrapper)"
    return None


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a gemmbridge ``Linear`` without activation, not a subclass (``MultiheadAttention``'s
    ``out_proj`` is one, and reads its weight without calling it; a parametrized layer is another)."""
    return type(module) is nn.Linear or (type(module) is Linear and module.activation == "none")


def bypassable(module: nn.Module) -> bool:
    """Whether reading ``module``'s ``weight`` and ``bias`` computes what calling it would: a plain linear layer
    and no hook, its own or global (cheap enough for every call: a few dictionary reads)."""
    return is_plain_linear(module) and hook_on(module) is None and not any(GLOBAL_HOOKS)


# What a module carries besides its parameters: the hooks torch keeps per module (``nn.Module.__init__``)
HOOK_ATTRIBUTES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def replace_child(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``parent``'s child ``name``, in that child's train/eval mode and with its hooks.

    The hooks are the replaced module's own dictionaries, so a handle the caller holds still removes its hook.
    """
    old = parent.get_submodule(name)
    new.train(old.training)
    vars(new).update({attribute: vars(old)[attribute] for attribute in HOOK_ATTRIBUTES})
    setattr(parent, name, new)


def check_pattern(where: str, pattern: object, argument: str = "pattern") -> str:
    """``pattern`` if it is a string (an ``fnmatch`` pattern), else an ``OptionError`` naming ``argument``."""
    if not isinstance(pattern, str):
        raise OptionError(f"{where}: {argument} {pattern!r} is not a string (an fnmatch pattern over module names)")
    return pattern


def convert_linears(model: nn.Module, pattern: str = "*", activation: str = "none") -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``pattern`` by a ``Linear``.

    ``pattern`` is an ``fnmatch`` pattern over names as ``model.named_modules()`` gives them
    (``"*"``: all; ``"*.mlp.*"``; ``"layers.0.attn.q_proj"``). Parameters are shared, not copied, so
    optimizers and ``state_dict`` keys are unchanged; each new layer keeps the replaced one's train/eval
    mode and hooks. Returns the names converted.
    """
    check_pattern("convert_linears", pattern)
    if activation not in ACTIVATIONS:
        raise OptionError(f"convert_linears: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and fnmatch.fnmatchcase(full, pattern):
                replace_child(module, child_name, Linear.from_linear(child, activation))
                converted.append(full)
    return converted
