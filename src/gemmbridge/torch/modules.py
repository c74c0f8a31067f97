"""``Linear`` and ``MLP`` modules, and ``convert_linears`` for models built from ``nn.Linear``."""

from __future__ import annotations

import fnmatch

import torch
from torch import Tensor, nn

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

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.activation)

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

    def forward(self, x: Tensor) -> Tensor:
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def convert_linears(model: nn.Module, pattern: str = "*", activation: str = "none") -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``pattern`` by a ``Linear``.

    ``pattern`` is an ``fnmatch`` pattern over names as ``model.named_modules()`` gives them
    (``"*"``: all; ``"*.mlp.*"``; ``"layers.0.attn.q_proj"``). Parameters are shared, not copied, so
    optimizers and ``state_dict`` keys are unchanged. Returns the names converted.
    """
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and fnmatch.fnmatchcase(full, pattern):
                setattr(module, child_name, Linear.from_linear(child, activation))
                converted.append(full)
    return converted
