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

_STREAMS: dict[int, Any] = {}


def _device(x: jax.Array) -> Any:
    devices = x.devices()
    if len(devices) != 1:
        raise OperandTypeError(f"matmul: a jax operand of shape {x.shape} is sharded over {len(devices)} devices")
    return next(iter(devices))


def _device_name(d: Any) -> str:
    return "cpu" if d.platform == "cpu" else f"cuda:{d.local_hardware_id}"


class JaxArrays:
    name = "jax"
    mutable = False

    def accepts(self, x: Any) -> bool:
        return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)

    def key(self, x: jax.Array) -> tuple:
        return x.shape, x.dtype, _device(x)

    def meta(self, x: jax.Array) -> TensorMeta:
        return TensorMeta(x.shape, contiguous_strides(x.shape), x.dtype.name, _device_name(_device(x)))

    def pointer(self, x: jax.Array) -> int:
        x.block_until_ready()
        return x.unsafe_buffer_pointer()

    def writable(self, x: Any) -> bool:
        return False

    def empty(self, shape: tuple[int, ...], like: jax.Array) -> jax.Array:
        return jnp.empty(shape, dtype=like.dtype, device=_device(like))

    def zeros(self, shape: tuple[int, ...], like: jax.Array) -> jax.Array:
        return jnp.zeros(shape, dtype=like.dtype, device=_device(like))

    def contiguous(self, x: jax.Array) -> jax.Array:
        return x

    def copy_into(self, dst: jax.Array, src: jax.Array) -> None:
        raise OperandTypeError("matmul: jax arrays are immutable; out= is not supported for them")

    def to_numpy(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, x: np.ndarray, like: jax.Array) -> jax.Array:
        return jax.device_put(x, _device(like))

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

    def stream(self, index: int) -> int:
        stream = _STREAMS.get(index)
        if stream is None:
            from cuda.core import Device

            device = Device(index)
            device.set_current()
            stream = _STREAMS[index] = device.create_stream()
        return int(stream.handle)

    def finish(self, index: int) -> None:
        """Wait for gemmbridge's stream: JAX cannot be told to order after it."""
        _STREAMS[index].sync()

    def capturing(self, index: int) -> bool:
        return False

    def workspace(self, nbytes: int, like: jax.Array) -> tuple[jax.Array, int]:
        buf = jnp.empty((nbytes,), dtype=jnp.uint8, device=_device(like))
        return buf, self.pointer(buf)

    def default_allow_tf32(self) -> bool:
        """TF32 only when JAX's default matmul precision was lowered explicitly."""
        precision = getattr(jax.config, "jax_default_matmul_precision", None)
        return precision in ("tensorfloat32", "default", "fastest", "bfloat16")
