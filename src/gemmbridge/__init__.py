"""gemmbridge: any framework's tensors to the vendor's tuned GEMM, zero-copy, on the caller's stream."""

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
from .ops import cache_size, clear_cache, matmul, set_autotune

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
    "ShapeError",
    "VendorError",
    "__version__",
    "cache_size",
    "clear_cache",
    "matmul",
    "set_autotune",
]
