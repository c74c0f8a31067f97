"""gemmbridge: any framework's tensors to the vendor's tuned GEMM, zero-copy, on the caller's stream."""

from . import epilogues
from .errors import (
    AliasError,
    BackendUnavailableError,
    DeviceError,
    DTypeError,
    GemmError,
    OperandTypeError,
    OptionError,
    OutOfMemoryError,
    ShapeError,
    VendorError,
)
from .ops import cache_size, clear_cache, matmul
from .plan import Plan, set_autotune, set_kernels

__version__ = "0.1.0"

__all__ = [
    "AliasError",
    "BackendUnavailableError",
    "DTypeError",
    "DeviceError",
    "GemmError",
    "OperandTypeError",
    "OptionError",
    "OutOfMemoryError",
    "Plan",
    "ShapeError",
    "VendorError",
    "__version__",
    "cache_size",
    "clear_cache",
    "epilogues",
    "matmul",
    "set_autotune",
    "set_kernels",
]
