"""Framework adapters: every framework type the rest of gemmbridge touches is behind one.

``adapter_for(x)`` returns the adapter of ``x``'s framework. An adapter reads an
array's metadata and pointer, allocates arrays like it in the caller's framework
(on the caller's current stream), and names the stream work must go on.
"""

from __future__ import annotations

from typing import Any, cast

from ..errors import OperandTypeError
from .base import ArrayAdapter

__all__ = ["BY_TYPE", "ArrayAdapter", "adapter_for"]

BY_TYPE: dict[type, ArrayAdapter] = {}


_BY_ROOT: dict[str, ArrayAdapter] = {}


def _new_adapter(root: str) -> ArrayAdapter | None:
    if root == "torch":
        from .torch import TorchArrays

        return cast(ArrayAdapter, TorchArrays())
    if root == "numpy":
        from .numpy import NumpyArrays

        return cast(ArrayAdapter, NumpyArrays())
    if root == "cupy":
        from .cupy import CupyArrays

        return cast(ArrayAdapter, CupyArrays())
    if root == "jax":  # jaxlib types are mapped to "jax" by _load
        from .jax import JaxArrays

        return cast(ArrayAdapter, JaxArrays())
    return None


def _load(kind: type) -> ArrayAdapter | None:
    """The one adapter of the framework that ``kind`` (or a base class of it) comes from."""
    for cls in kind.__mro__:
        root = cls.__module__.split(".", 1)[0]
        root = "jax" if root == "jaxlib" else root
        if root not in _BY_ROOT:
            adapter = _new_adapter(root)
            if adapter is None:
                continue
            _BY_ROOT[root] = adapter
        return _BY_ROOT[root]
    return None


def adapter_for(x: Any, name: str) -> ArrayAdapter:
    """The adapter for operand ``name``, or OperandTypeError naming what it got."""
    kind = type(x)
    adapter = BY_TYPE.get(kind)
    if adapter is None:
        adapter = _load(kind)
        if adapter is None or not adapter.accepts(x):
            raise OperandTypeError(
                f"matmul: {name} is a {kind.__module__}.{kind.__qualname__}, not a tensor or array "
                "(supported: torch.Tensor, numpy.ndarray, cupy.ndarray, jax.Array)"
            )
        BY_TYPE[kind] = adapter
    return adapter
