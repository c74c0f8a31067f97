"""One exception hierarchy for every mistake gemmbridge detects.

Each class also subclasses the built-in exception a Python user would expect
(``ValueError`` for bad shapes, ``TypeError`` for bad types, ...), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations

import math


class GemmError(Exception):
    """Base class of every error raised by gemmbridge."""


class ShapeError(GemmError, ValueError):
    """Operand shapes do not fit together (inner dims, batch broadcast, out, c, bias)."""


class DTypeError(GemmError, TypeError):
    """Operand dtypes differ or are not supported."""


class DeviceError(GemmError, ValueError):
    """Operands live on different devices, or on CPU and GPU mixed."""


class OperandTypeError(GemmError, TypeError):
    """An operand is not a tensor/array of a supported framework."""


class AliasError(GemmError, ValueError):
    """``out`` overlaps an input (other than being exactly ``c``) or itself."""


class OptionError(GemmError, ValueError):
    """An option has an unknown or inconsistent value (epilogue, transpose, out with JAX...)."""


class BackendUnavailableError(GemmError, RuntimeError):
    """The backend the operands need is not installed or cannot start."""


class MissingPackageError(GemmError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra that installs it."""


class VendorError(GemmError, RuntimeError):
    """The vendor library returned an error status for a problem."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


class OutOfMemoryError(GemmError, MemoryError):
    """The result does not fit in the device's memory (raised where the result is allocated)."""


def allocation_failed(
    what: str, shape: tuple[int, ...], dtype: str, itemsize: int, device: str, error: BaseException
) -> BaseException:
    """The error to raise when the framework could not allocate ``what``: OutOfMemoryError, or ``error`` itself."""
    if not (isinstance(error, MemoryError) or "out of memory" in str(error).lower()):
        return error
    size = itemsize * math.prod(shape)
    return OutOfMemoryError(
        f"matmul: the {what} {shape} {dtype} ({size / 2**30:.2f} GiB) does not fit in {device} memory: {error}"
    )
