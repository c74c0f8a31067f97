"""gemmbridge: any framework's tensors to the vendor's tuned GEMM, zero-copy, on the caller's stream."""

from typing import Any

from . import epilogues
from .errors import (
    AliasError,
    BackendUnavailableError,
    DeviceError,
    DTypeError,
    GemmError,
    MissingPackageError,
    OperandTypeError,
    OptionError,
    OutOfMemoryError,
    ShapeError,
    VendorError,
)
from .ops import cache_size, clear_cache, matmul
from .plan import Plan, set_autotune, set_graphs, set_kernels

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``tune``, ``tune_model``, ``TuneResult`` (ahead-of-time tuning, docs/tuning.md), imported on first use."""
    if name in ("tune", "tune_model", "TuneResult"):
        from . import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'gemmbridge' has no attribute {name!r}")


__all__ = [
    "AliasError",
    "BackendUnavailableError",
    "DTypeError",
    "DeviceError",
    "GemmError",
    "MissingPackageError",
    "OperandTypeError",
    "OptionError",
    "OutOfMemoryError",
    "Plan",
    "ShapeError",
    "TuneResult",
    "VendorError",
    "__version__",
    "cache_size",
    "clear_cache",
    "epilogues",
    "matmul",
    "set_autotune",
    "set_graphs",
    "set_kernels",
    "tune",
    "tune_model",
]
