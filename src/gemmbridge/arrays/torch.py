"""PyTorch tensors (CPU and CUDA).

Autograd rules, as ``torch.mm(out=...)`` applies them: an output is never written behind autograd's
back. An ``out`` that requires grad (with grad mode on), an inference tensor outside inference mode,
or an output whose inputs require grad are refused; every output written through a pointer has its
version counter bumped, so a tensor saved for backward and overwritten later fails loudly in
backward instead of giving wrong gradients.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ..errors import OperandTypeError
from ..problem import TensorMeta

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_is_grad_enabled = torch.is_grad_enabled
# absent from CPU-only builds of torch, where no CUDA call is made
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)
_increment_version = torch._C._increment_version  # type: ignore[attr-defined]
_is_compiling = torch.compiler.is_compiling


def records(*tensors: Any) -> bool:
    """True when autograd must record a call on these operands (None for an absent one): grad mode is on and an
    input requires grad."""
    return _is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class TorchLayer:
    """The calls of ``gemmbridge.matmul`` that belong to the PyTorch layer (``gemmbridge.torch``): those autograd must
    record, and every call ``torch.compile`` traces. The layer registers its entry point (``entry``) when it is
    imported; the first such call imports it."""

    entry: Callable[..., Any] | None = None

    def takes(self, a: torch.Tensor, b: torch.Tensor, c: Any, bias: Any) -> bool:
        return records(a, b, c, bias) or _is_compiling()

    def __call__(self, a: torch.Tensor, b: torch.Tensor, **options: Any) -> Any:
        if self.entry is None:
            importlib.import_module("gemmbridge.torch")  # registers the entry
        assert self.entry is not None
        return self.entry(a, b, **options)


LAYER = TorchLayer()


def _dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def tensor_from_numpy(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``x``'s memory (ml_dtypes bfloat16 seen as torch.bfloat16)."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
SMALL_PRODUCT = 1 << 16  # M·K·N under which NumPy's BLAS stays single-threaded and torch's would cost more
_TYPESTR = {torch.float16: "<f2", torch.bfloat16: "<i2", torch.float32: "<f4", torch.float64: "<f8", torch.uint8: "|u1"}


class _HostView:
    """Carries an ``__array_interface__`` for NumPy, and the tensor, which the array keeps alive through it
    (``Tensor.numpy()`` would make the tensor's storage unresizable for good, which breaks FSDP2's freeing
    of unsharded parameters)."""

    __slots__ = ("__array_interface__", "tensor")
    __array_interface__: dict[str, Any]
    tensor: torch.Tensor


def numpy_view(x: torch.Tensor) -> np.ndarray:
    """A NumPy array over a CPU tensor's memory (torch.bfloat16 seen as ml_dtypes bfloat16), no side effect."""
    size = x.element_size()
    host = _HostView()
    host.tensor = x
    host.__array_interface__ = {
        "shape": tuple(x.shape),
        "strides": tuple([s * size for s in x.stride()]),
        "typestr": _TYPESTR[x.dtype],
        "data": (x.data_ptr(), False),
        "version": 3,
    }
    found = np.asarray(host)
    return found.view(_BFLOAT16) if x.dtype == torch.bfloat16 else found


def tf32_policy() -> bool:
    """torch's TF32 setting for float32 matmuls: the legacy flag, or the ``fp32_precision`` API (torch ≥ 2.9).

    Once the new API has been used, torch's legacy getter raises ("mix of the legacy and new APIs").
    """
    try:
        return bool(torch._C._get_cublas_allow_tf32())  # type: ignore[attr-defined]
    except RuntimeError:
        precision = torch.backends.cuda.matmul.fp32_precision
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"


@contextlib.contextmanager
def tf32_setting(enabled: bool) -> Iterator[None]:
    """torch's TF32 setting for float32 matmuls set to ``enabled`` for the block, restored exactly after: through
    ``fp32_precision`` where torch has it (≥ 2.9), else the legacy flag (once the new API has been used, reading the
    legacy one raises, as ``tf32_policy`` says)."""
    flags = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "tf32" if enabled else "ieee") if hasattr(flags, "fp32_precision") else (
        "allow_tf32", enabled)  # fmt: skip
    before = getattr(flags, name)
    setattr(flags, name, value)
    try:
        yield
    finally:
        setattr(flags, name, before)


class TorchCall:
    """One call's device, stream, capture state and allocator (CUDA), or NumPy views (CPU)."""

    __slots__ = ("device", "stream", "capturing", "like")
    finish = None  # work is ordered on the caller's stream: nothing to wait for
    graph_owns_memory = True

    def __init__(self, device: int, like: torch.Tensor) -> None:
        self.device, self.like = device, like
        if device >= 0:
            self.stream = _raw_stream(device)  # type: ignore[misc]
            # the legacy default stream (torch's default, 0) cannot be captured: no query needed for it
            self.capturing = self.stream > 1 and _is_capturing()  # type: ignore[misc]
        else:
            self.stream, self.capturing = 0, False

    def tf32(self) -> bool:
        return tf32_policy()

    def empty(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        like, wanted = self.like, DTYPES[dtype]
        return like.new_empty(shape) if like.dtype is wanted else like.new_empty(shape, dtype=wanted)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        return self.like.new_zeros(shape, dtype=DTYPES[dtype])

    def contiguous(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().contiguous()

    def transposed(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().mT.contiguous()

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.no_grad():
            dst.copy_(src)

    def host(self, x: torch.Tensor) -> np.ndarray:
        return numpy_view(x)

    def from_host(self, x: np.ndarray) -> torch.Tensor:
        return tensor_from_numpy(x)

    @staticmethod
    def blas(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The product by torch's BLAS, in torch's thread pool, on the same memory; NumPy's for a product too
        small for its BLAS to start threads (handing it to torch would cost more than it computes)."""
        if a.shape[-2] * a.shape[-1] * b.shape[-1] < SMALL_PRODUCT:
            return np.matmul(a, b, out=out)
        if out is not None and out.flags.c_contiguous:
            torch.matmul(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
            return out
        product = numpy_view(torch.matmul(torch.from_numpy(a), torch.from_numpy(b)))
        if out is None:
            return product
        np.copyto(out, product)  # torch's out= refuses some strided batched views
        return out


class TorchArrays:
    name = "torch"
    mutable = True
    layer = LAYER

    def accepts(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def key(self, x: torch.Tensor) -> tuple:
        return x.shape, x.stride(), x.dtype, x.device, x.layout, x.is_neg()

    def meta(self, x: torch.Tensor) -> TensorMeta:
        what = f"a torch tensor of shape {tuple(x.shape)}"
        if x.layout != torch.strided:
            raise OperandTypeError(f"matmul: {what} has layout {x.layout}; only strided (dense) tensors are supported")
        if x.is_neg() or x.is_conj():
            raise OperandTypeError(
                f"matmul: {what} has the {'negative' if x.is_neg() else 'conjugate'} bit set (a lazily negated or "
                "conjugated view): call .resolve_neg() / .resolve_conj() on it first"
            )
        return TensorMeta(tuple(x.shape), tuple(x.stride()), _dtype_name(x.dtype), str(x.device))

    def pointer(self, x: torch.Tensor) -> int:
        return x.data_ptr()

    def writable(self, x: torch.Tensor) -> str | None:
        if x.requires_grad and _is_grad_enabled():
            if x.is_leaf:
                return "it is a leaf that requires grad (write into it under torch.no_grad())"
            return "it requires grad: autograd cannot see a write through out= (use the result instead)"
        if x.is_inference() and not torch.is_inference_mode_enabled():
            return "it is an inference tensor, written outside torch.inference_mode()"
        return None

    autograd = staticmethod(records)

    def written(self, x: torch.Tensor) -> None:
        _increment_version((x,))

    def context(self, device: int, like: torch.Tensor) -> TorchCall:
        return TorchCall(device, like)

    def current_device(self) -> int:
        return torch._C._cuda_getDevice()  # type: ignore[attr-defined]

    def device_guard(self, index: int) -> AbstractContextManager:
        return torch.cuda.device(index)


VIEW: Any = TorchArrays()  # the one view of torch tensors (stateless): the registry's, the training layer's
