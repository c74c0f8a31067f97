"""The project's own tuned Triton GEMM: the "write our own kernel" alternative to a vendor library.

A standard tiled matmul (grouped tile order for L2 reuse, fp32 accumulation, masked edges), autotuned per
(M, N, K, dtype) over a handful of Hopper-friendly configurations. Inputs are torch CUDA tensors of
bfloat16, float16 or float32 on the current device, 2-D or batched 3-D (a 2-D operand broadcasts over the
batch), any strides.
float32 runs on TF32 tensor cores only when ``allow_tf32`` is set (``input_precision="tf32"``), else in
full fp32 (``"ieee"``). Each family has its own config list, since a 4-byte tile needs twice the shared
memory of a 2-byte one.

This module imports Triton at import time: import it only where Triton is installed (``candidates.py``
does so lazily).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); GROUP_M is 8 throughout
_CONFIGS = {
    "16bit": [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 64, 4, 8),
              (64, 256, 64, 4, 4), (64, 128, 64, 4, 4)],
    "tf32": [(128, 256, 32, 3, 8), (128, 128, 64, 3, 8), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4),
             (64, 128, 32, 4, 4)],
    "ieee": [(128, 128, 32, 3, 8), (128, 64, 32, 3, 4), (64, 128, 32, 3, 4), (64, 64, 32, 3, 4)],
}  # fmt: skip
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One BLOCK_M × BLOCK_N tile of C[batch] = A[batch] @ B[batch]; program axis 1 is the batch."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # rows past the edge wrap; masked at the store
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c = acc.to(c_ptr.dtype.element_ty)
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + batch * stride_cb + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


def _quick_bench(kernel_call: Any, quantiles: Any) -> Any:
    """Autotuning's timer: shorter than Triton's default (25 ms warm-up, 100 ms) to keep the bench quick."""
    return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


_kernels: dict[str, Any] = {}


def _kernel(family: str) -> Any:
    """The autotuned kernel of one config family, built on first use."""
    kernel = _kernels.get(family)
    if kernel is None:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in _CONFIGS[family]
        ]
        extra = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
        kernel = _kernels[family] = triton.autotune(configs=configs, key=["M", "N", "K"], **extra)(_matmul_kernel)
    return kernel


def unsupported(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why this kernel cannot take ``a @ b``, or None."""
    if a.dtype != b.dtype or a.dtype not in _DTYPES:
        return f"the Triton kernel takes bfloat16, float16 or float32 (got {a.dtype}, {b.dtype})"
    if not a.is_cuda or a.device != b.device or a.device.index != torch.cuda.current_device():
        return "the Triton kernel takes CUDA tensors on the current device"
    if a.dim() not in (2, 3) or b.dim() not in (2, 3) or a.shape[-1] != b.shape[-2]:
        return f"the Triton kernel takes (batch,) M×K @ (batch,) K×N (got {tuple(a.shape)} @ {tuple(b.shape)})"
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0]:
        return "the Triton kernel takes equal batch sizes"
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if max(m * k, k * n, m * n) >= 2**31:
        return "the Triton kernel indexes one matrix with 32-bit offsets"
    return None


def matmul(a: torch.Tensor, b: torch.Tensor, allow_tf32: bool = False) -> torch.Tensor:
    """``a @ b`` with the autotuned Triton kernel (the first call for a new M, N, K autotunes)."""
    reason = unsupported(a, b)
    if reason:
        raise ValueError(reason)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batched = a.dim() == 3 or b.dim() == 3
    batch = a.shape[0] if a.dim() == 3 else (b.shape[0] if b.dim() == 3 else 1)
    c = torch.empty((batch, m, n) if batched else (m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0 or batch == 0:
        return c
    if k == 0:
        return c.zero_()
    sa = (a.stride(0) if a.dim() == 3 else 0, a.stride(-2), a.stride(-1))
    sb = (b.stride(0) if b.dim() == 3 else 0, b.stride(-2), b.stride(-1))
    sc = (c.stride(0) if batched else 0, c.stride(-2), c.stride(-1))
    if a.dtype == torch.float32:
        family, precision = ("tf32", "tf32") if allow_tf32 else ("ieee", "ieee")
    else:
        family, precision = "16bit", "tf32"  # precision applies to float32 inputs only

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch

    _kernel(family)[grid](a, b, c, m, n, k, *sa, *sb, *sc, PRECISION=precision)
    return c
