"""Optional packages, imported where a feature needs them: a missing one raises an error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingPackageError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module`` imported; else ``MissingPackageError``: ``feature`` needs it, ``pip install 'gemmbridge[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.partition(".")[0]
        raise MissingPackageError(
            f"{feature} needs {package} ({type(error).__name__}: {error}): pip install 'gemmbridge[{extra}]'"
        ) from None  # the message carries the original error
