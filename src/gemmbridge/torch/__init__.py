"""gemmbridge for PyTorch training: differentiable ops, ``Linear``, ``MLP``, ``LoRALinear`` and their helpers.

Importing this module registers the ``gemmbridge::gemm`` custom op (``torch.ops.gemmbridge.gemm``) and hands
``gemmbridge.matmul`` the calls that need autograd or that ``torch.compile`` traces; every op here traces into
one graph without breaks, in training and inference.
The PEFT bridge is ``gemmbridge.torch.peft`` (it needs the optional ``peft`` package).
"""

from .._optional import require

require("torch", "torch", "gemmbridge.torch")  # before the modules below import it: the message names the extra

from ..arrays.torch import LAYER  # noqa: E402
from ..plan import PLANS  # noqa: E402
from . import lane, lora_kernels  # noqa: E402
from .functional import linear, lora_linear, matmul, mlp  # noqa: E402
from .lora import LoRALinear, apply_lora, load_adapters, save_adapters  # noqa: E402
from .modules import MLP, Linear, convert_linears  # noqa: E402

LAYER.entry = matmul  # gemmbridge.matmul's calls that autograd records or torch.compile traces come here
PLANS.on_clear.extend((lane.clear, lora_kernels.clear))  # clear_cache and set_kernels forget the lane's layouts too

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
