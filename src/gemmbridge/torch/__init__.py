"""gemmbridge for PyTorch training: differentiable ops, ``Linear``, ``MLP``, ``LoRALinear`` and their helpers.

Importing this module registers the ``gemmbridge::gemm``, ``::matmul``, ``::linear``, ``::mlp`` and
``::lora_linear`` custom ops (``torch.ops.gemmbridge``), which ``torch.compile`` traces without graph breaks.
The PEFT bridge is ``gemmbridge.torch.peft`` (it needs the optional ``peft`` package).
"""

from .._optional import require

require("torch", "torch", "gemmbridge.torch")  # before the modules below import it: the message names the extra

from .functional import linear, lora_linear, matmul, mlp  # noqa: E402
from .lora import LoRALinear, apply_lora, load_adapters, save_adapters  # noqa: E402
from .modules import MLP, Linear, convert_linears  # noqa: E402

__all__ = [
    "MLP",
    "Linear",
    "LoRALinear",
    "apply_lora",
    "convert_linears",
    "linear",
    "load_adapters",
    "lora_linear",
    "matmul",
    "mlp",
    "save_adapters",
]
