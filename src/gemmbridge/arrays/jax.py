"""JAX arrays (CPU and CUDA; single-device, outside ``jax.jit``).

JAX arrays are immutable and JAX exposes no stream, so on the GPU gemmbridge
waits for the inputs to be ready, runs on a stream of its own and waits for
that stream before returning the new array. ``out=`` is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import OperandTypeError
from ..problem import TensorMeta, contiguous_strides
from .numpy import numpy_dtype

_STREAMS: dict[int, Any] = {}


def _device(x: jax.Array) -> Any:
    devices = x.devices()
    if len(devices) != 1:
        raise OperandTypeError(f"matmul: a jax operand of shape {x.shape} is sharded over {len(devices)} devices")
    return next(iter(devices))


def _device_name(d: Any) -> str:
    return "cpu" if d.platform == "cpu" else f"cuda:{d.local_hardware_id}"


def _own_stream(index: int) -> Any:
    stream = _STREAMS.get(index)
    if stream is None:
        from cuda.core import Device

        device = Device(index)
        device.set_current()
        stream = _STREAMS[index] = device.create_stream()
    return stream


class JaxCall:
    """One call on gemmbridge's own stream of the device (GPU), or on NumPy copies (CPU)."""

    __slots__ = ("device", "stream", "target", "finish")
    capturing = False
    graph_owns_memory = False

    def __init__(self, device: int, like: jax.Array) -> None:
        self.device, self.target = device, _device(like)
        if device >= 0:
            own = _own_stream(device)
            self.stream, self.finish = int(own.handle), own.sync
        else:
            self.stream, self.finish = 0, None

    def tf32(self) -> bool:
        """TF32 only when JAX's default matmul precision was lowered explicitly."""
        precision = getattr(jax.config, "jax_default_matmul_precision", None)
        return precision in ("tensorfloat32", "default", "fastest", "bfloat16")

    def empty(self, shape: tuple[int, ...], dtype: str) -> jax.Array:
        return jnp.empty(shape, dtype=numpy_dtype(dtype), device=self.target)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> jax.Array:
        return jnp.zeros(shape, dtype=numpy_dtype(dtype), device=self.target)

    def contiguous(self, x: jax.Array) -> jax.Array:
        return x

    def transposed(self, x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x, -1, -2)

    def copy_into(self, dst: jax.Array, src: jax.Array) -> None:
        raise OperandTypeError("matmul: jax arrays are immutable; out= is not supported for them")

    def host(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x)

    def from_host(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, self.target)

    blas = staticmethod(np.matmul)


class JaxArrays:
    name = "jax"
    mutable = False
    autograd = None
    layer = None
    written = None

    def accepts(self, x: Any) -> bool:
        return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)

    def key(self, x: jax.Array) -> tuple:
        return x.shape, x.dtype, _device(x)

    def meta(self, x: jax.Array) -> TensorMeta:
        return TensorMeta(x.shape, contiguous_strides(x.shape), x.dtype.name, _device_name(_device(x)))

    def pointer(self, x: jax.Array) -> int:
        x.block_until_ready()
        return x.unsafe_buffer_pointer()

    def writable(self, x: jax.Array) -> str | None:
        return "jax arrays are immutable: out= is not supported for them"

    def context(self, device: int, like: jax.Array) -> JaxCall:
        return JaxCall(device, like)

    def current_device(self) -> int:
        from cuda.core import Device

        return Device().device_id

    @contextlib.contextmanager
    def device_guard(self, index: int) -> Iterator[None]:
        from cuda.core import Device

        previous = Device()
        Device(index).set_current()
        try:
            yield
        finally:
            previous.set_current()
