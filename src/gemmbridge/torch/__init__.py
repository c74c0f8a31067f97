"""gemmbridge for PyTorch training: differentiable ops, ``Linear``, ``MLP``, and ``convert_linears``.

Importing this module registers the ``gemmbridge::gemm``, ``::matmul``, ``::linear`` and ``::mlp``
custom ops (``torch.ops.gemmbridge``), which ``torch.compile`` traces without graph breaks.
"""

from .functional import linear, matmul, mlp
from .modules import MLP, Linear, convert_linears

__all__ = ["MLP", "Linear", "convert_linears", "linear", "matmul", "mlp"]
