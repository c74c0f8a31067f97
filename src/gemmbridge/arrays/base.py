"""The two interfaces a framework implements: a view of its tensors, and a context for one call.

``TensorView`` is what gemmbridge reads from an operand (a cache key, its metadata, its address)
and the framework's rules for using it (``autograd``: must the call be recorded for backward;
``writable``: may an output be written; ``written``: tell the framework an output was written
behind its back). It is stateless and
shared.

``CallContext`` is resolved once per call, for one device: the stream the work goes on, whether
that stream is being captured into a CUDA graph, the framework's TF32 policy, and the allocator
(results are allocated by the caller's framework on that stream). CPU calls get a context too:
it hands NumPy views of the operands to the CPU backend.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from ..problem import TensorMeta


class CallContext(Protocol):
    device: int  # CUDA device index, -1 on the CPU
    stream: int  # raw CUDA stream handle the call is enqueued on (0 on the CPU)
    capturing: bool  # the stream is being captured into a CUDA graph
    graph_owns_memory: bool  # memory allocated during a capture lives as long as the graph (torch's graph pools)
    finish: Callable[[], None] | None  # waits for gemmbridge's own stream (frameworks with no stream API)

    def tf32(self) -> bool: ...  # the framework's default for float32 on tensor cores
    def empty(self, shape: tuple[int, ...], dtype: str) -> Any: ...
    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any: ...
    def contiguous(self, x: Any) -> Any: ...
    def transposed(self, x: Any) -> Any: ...  # a contiguous copy of x with its last two dims swapped
    def copy_into(self, dst: Any, src: Any) -> None: ...
    def host(self, x: Any) -> np.ndarray: ...  # CPU only: a NumPy view of x
    def blas(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...  # CPU only
    def from_host(self, x: np.ndarray) -> Any: ...  # CPU only: x as the framework's array


class TensorView(Protocol):
    """One framework's arrays, as gemmbridge sees them.

    ``key(x)`` is the hashable cache key of everything but the pointer; ``meta(x)`` the same as a
    ``TensorMeta`` (built only on a cache miss), or the error that this operand cannot be used.
    """

    name: str
    mutable: bool  # False for frameworks whose arrays cannot be written (JAX)
    # None, or autograd(a, b, c, bias) -> True when the framework's autograd must record the call
    autograd: Callable[..., bool] | None
    # None, or the framework's own layer above gemmbridge: layer.takes(a, b, c, bias) says whether a matmul call
    # belongs to it (autograd, a compiler tracing), and layer(a, b, **options) computes it there
    layer: Any
    # None, or a callable told of each output written through a pointer (version counters)
    written: Callable[[Any], None] | None

    def accepts(self, x: Any) -> bool: ...
    def key(self, x: Any) -> tuple: ...
    def meta(self, x: Any) -> TensorMeta: ...
    def pointer(self, x: Any) -> int: ...
    def writable(self, x: Any) -> str | None: ...  # None, or why x cannot be written
    def context(self, device: int, like: Any) -> CallContext: ...
    def current_device(self) -> int: ...
    def device_guard(self, index: int) -> AbstractContextManager: ...
