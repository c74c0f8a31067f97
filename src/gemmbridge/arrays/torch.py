"""PyTorch tensors (CPU and CUDA)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..problem import TensorMeta

_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def tensor_from_numpy(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``x``'s memory (ml_dtypes bfloat16 seen as torch.bfloat16)."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


class TorchArrays:
    name = "torch"
    mutable = True
    finish = None  # work is ordered on the caller's stream: nothing to wait for

    def accepts(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def key(self, x: torch.Tensor) -> tuple:
        return x.shape, x.stride(), x.dtype, x.device

    def meta(self, x: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(x.shape), tuple(x.stride()), _dtype_name(x.dtype), str(x.device))

    def pointer(self, x: torch.Tensor) -> int:
        return x.data_ptr()

    def writable(self, x: Any) -> bool:
        return True

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return like.new_empty(shape)

    def zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def contiguous(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    def from_numpy(self, x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return tensor_from_numpy(x)

    def current_device(self) -> int:
        return torch._C._cuda_getDevice()  # type: ignore[attr-defined]

    def device_guard(self, index: int) -> torch.cuda.device:
        return torch.cuda.device(index)

    def stream(self, index: int) -> int:
        return torch._C._cuda_getCurrentRawStream(index)  # type: ignore[attr-defined]

    def capturing(self, index: int) -> bool:
        return torch._C._cuda_isCurrentStreamCapturing()  # type: ignore[attr-defined]

    def workspace(self, nbytes: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=like.device)
        return buf, buf.data_ptr()

    def default_allow_tf32(self) -> bool:
        return torch._C._get_cublas_allow_tf32()  # type: ignore[attr-defined]
