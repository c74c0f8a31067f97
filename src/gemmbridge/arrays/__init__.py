"""Framework adapters: every framework type the rest of gemmbridge touches is behind one.

``view_for(x)`` returns the ``TensorView`` of ``x``'s framework: it reads an operand's cache key,
metadata and address, and makes the per-call ``CallContext`` (stream, capture state, TF32 policy,
allocator) that the backends use.
"""

from __future__ import annotations

from typing import Any, cast

from ..errors import OperandTypeError
from .base import CallContext, TensorView

__all__ = ["BY_TYPE", "CallContext", "TensorView", "view_for"]

BY_TYPE: dict[type, TensorView] = {}
_BY_ROOT: dict[str, TensorView] = {}


def _new_view(root: str) -> TensorView | None:
    if root == "torch":
        from .torch import VIEW

        return cast(TensorView, VIEW)
    if root == "numpy":
        from .numpy import NumpyArrays

        return cast(TensorView, NumpyArrays())
    if root == "cupy":
        from .cupy import CupyArrays

        return cast(TensorView, CupyArrays())
    if root == "jax":  # jaxlib types are mapped to "jax" by _load
        from .jax import JaxArrays

        return cast(TensorView, JaxArrays())
    return None


def _load(kind: type) -> TensorView | None:
    """The one view of the framework that ``kind`` (or a base class of it) comes from."""
    for cls in kind.__mro__:
        root = cls.__module__.split(".", 1)[0]
        root = "jax" if root == "jaxlib" else root
        if root not in _BY_ROOT:
            view = _new_view(root)
            if view is None:
                continue
            _BY_ROOT[root] = view
        return _BY_ROOT[root]
    return None


def view_for(x: Any, name: str) -> TensorView:
    """The view for operand ``name``, or OperandTypeError naming what it got."""
    kind = type(x)
    view = BY_TYPE.get(kind)
    if view is None:
        view = _load(kind)
        if view is None or not view.accepts(x):
            raise OperandTypeError(
                f"matmul: {name} is a {kind.__module__}.{kind.__qualname__}, not a tensor or array "
                "(supported: torch.Tensor, numpy.ndarray, cupy.ndarray, jax.Array)"
            )
        BY_TYPE[kind] = view
    return view
