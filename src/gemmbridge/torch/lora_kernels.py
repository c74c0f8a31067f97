"""LoRA's own CUDA kernels in the launch lane: the GEMMs with dropout inside, and ``dy`` read once.

``masked(a, b, c, transpose_a, transpose_b, alpha, beta, role, keep, seed, out)`` is ``lane.gemm``'s plain product
with the dropout mask of x (``backends/cuda/kernels/dropout.py``) applied where the skinny kernel reads x:
``role`` "a" (x is op(a)), "b" (x is op(b)) or "d" (the product is masked before alpha and beta). The mask is a
pure function of the 64-bit seed in ``seed`` (a one-element int64 CUDA tensor the forward draws with torch's
generator, so CUDA-graph replays draw fresh masks) and of each element's place in x; nothing of it is stored. A
layout the kernel does not serve takes the same mask written out as bytes (``dropout.fill_mask``) and aten's GEMM.

``dy_once(dy, lora_b, xs, alpha_g, db_dtype)`` gives ``(alpha_g · dy·B, dyᵀ·xs)`` from one read of dy
(``kernels/lora.py``), or None where its kernels do not serve the shapes. It runs only with ``set_kernels("on")``
until a measured rule says where it beats two GEMMs (docs/kernels.md).

Each layout is resolved once, as in ``lane``; ``eligible`` says whether x's device can run the kernels at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import plan
from ..arrays.torch import VIEW
from ..errors import GemmError
from ..problem import Operands, describe
from .lane import HALF, forget, layout, remember, uncast

_raw_stream: Any = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_masked: dict[tuple, Callable[..., Tensor]] = {}
_dy_once: dict[tuple, Any] = {}
_devices: dict[int, bool] = {}


def eligible(x: Tensor, dtype: torch.dtype) -> bool:
    """True when the dropout kernels can run for activations like ``x`` computed in ``dtype``: half precision on a
    CUDA GPU of compute capability 9.0 or later, kernels not "off" (``gemmbridge.set_kernels``)."""
    if x.device.type != "cuda" or dtype not in HALF:
        return False
    kernels = plan.cuda().kernels
    if kernels.mode == "off":
        return False
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    found = _devices.get(device)
    if found is None:
        info = kernels.device_info(device)
        found = _devices[device] = info is not None and info[0] >= 9
    return found


def kept(keep: float) -> float:
    """The probability the mask keeps an element with (``keep`` to 2⁻¹⁶): scaling by its inverse is unbiased."""
    from ..backends.cuda.kernels import dropout

    return dropout.effective_keep(keep)


def clear() -> None:
    """Forget every resolved layout (with the lane's table)."""
    forget(_masked, _dy_once)


def resolved() -> int:
    """How many layouts these kernels' tables hold."""
    return len(_masked) + len(_dy_once)


def _meta(x: Tensor | None) -> Any:
    return None if x is None else VIEW.meta(x)


def _key(*tensors: Tensor | None) -> tuple:
    return tuple(None if t is None else layout(t) for t in tensors)


def _on_device(launch: Callable[..., Any], device: int) -> Callable[..., Any]:
    """``launch`` with ``device`` current (its kernel runs in the current context) and its primary context made
    current on this thread."""
    ensure = plan.cuda().ensure_context

    def run(*args: Any) -> Any:
        if torch._C._cuda_getDevice() != device:  # type: ignore[attr-defined]
            with torch.cuda.device(device):
                return run(*args)
        ensure(device)
        return launch(*args)

    return run


def seed_for(x: Tensor) -> Tensor:
    """A fresh 64-bit seed on ``x``'s device, drawn on the current stream by torch's CUDA generator."""
    return torch.randint(-(2**62), 2**62, (1,), dtype=torch.int64, device=x.device)


@uncast
def masked(
    a: Tensor, b: Tensor, c: Tensor | None, ta: bool, tb: bool, alpha: float, beta: float, role: str, keep: float,
    seed: Tensor, out_dtype: torch.dtype | None = None, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``alpha · op(a) @ op(b) + beta · c`` with x's dropout mask applied in ``role`` (module doc)."""
    key = (*_key(a, b, c, out), c is out, ta, tb, role, keep, out_dtype)
    launch = _masked.get(key)
    if launch is None:
        launch = _on_device(_resolve_masked(a, b, c, ta, tb, role, keep, out_dtype, out), a.device.index)
        remember(_masked, key, launch)
    return launch(a, b, c, alpha, beta, seed, out)


def _resolve_masked(
    a: Tensor, b: Tensor, c: Tensor | None, ta: bool, tb: bool, role: str, keep: float,
    out_dtype: torch.dtype | None, out: Tensor | None,
) -> Callable[..., Tensor]:  # fmt: skip
    from ..backends.cuda.kernels import dropout

    problem = describe(_meta(a), _meta(b), c=_meta(c), out=_meta(out), transpose_a=ta, transpose_b=tb,
                       out_dtype=out_dtype)  # fmt: skip
    device, shape, dtype = a.device.index, problem.out_shape, out_dtype or a.dtype
    unfused = _unfused(problem, ta, tb, role, keep, dtype)
    try:
        gemm = dropout.MaskedGemm(problem, device, role, keep)
    except GemmError:
        return unfused

    def fused(a: Tensor, b: Tensor, c: Any, alpha: float, beta: float, seed: Tensor, out: Any) -> Tensor:
        d = a.new_empty(shape, dtype=dtype) if out is None else out
        pa, pb, pd = a.data_ptr(), b.data_ptr(), d.data_ptr()
        pc = pd if c is None else c.data_ptr()
        if (pa | pb | pc | pd) & 15:  # the kernel reads 16-byte pieces: a view off that alignment takes the bytes
            return unfused(a, b, c, alpha, beta, seed, out)
        gemm.launch(Operands(pa, pb, pc, pd, 0, 0, 0), alpha, beta if c is not None else 0.0, seed.data_ptr(),
                    _raw_stream(device))  # fmt: skip
        return d

    return fused


def _unfused(problem: Any, ta: bool, tb: bool, role: str, keep: float, dtype: torch.dtype) -> Callable[..., Tensor]:
    """The same mask written out as bytes, then aten's GEMM (a layout the kernel does not serve)."""
    from ..backends.cuda.kernels import dropout

    rows, cols = {"a": (problem.m, problem.k), "b": (problem.k, problem.n), "d": (problem.m, problem.n)}[role]

    def unfused(a: Tensor, b: Tensor, c: Any, alpha: float, beta: float, seed: Tensor, out: Any) -> Tensor:
        device = a.device.index
        mask = torch.empty((rows, cols), dtype=torch.uint8, device=a.device)
        dropout.fill_mask(seed.data_ptr(), mask.data_ptr(), rows, cols, keep, _raw_stream(device), device=device)
        am, bm = (a.t() if ta else a).to(dtype), (b.t() if tb else b).to(dtype)
        if role == "a":
            am = am * mask
        elif role == "b":
            bm = bm * mask
        product = torch.mm(am, bm).mul_(alpha)
        if role == "d":
            product.mul_(mask)
        if c is not None and beta != 0.0:
            product.add_(c, alpha=beta)
        return product if out is None else out.copy_(product)

    return unfused


def dy_once(dy: Tensor, lora_b: Tensor, xs: Tensor, alpha_g: float, db_dtype: torch.dtype | None) -> Any:
    """``(alpha_g · dy · B, dyᵀ · xs)`` from one read of dy, or None where the kernels do not serve (module doc)."""
    if plan.cuda().kernels.mode != "on":
        return None
    key = (*_key(dy, lora_b, xs), db_dtype)
    found = _dy_once.get(key, False)
    if found is False:
        found = _resolve_dy_once(dy, lora_b, xs, db_dtype)
        remember(_dy_once, key, found)
    return None if found is None else found(dy, lora_b, xs, alpha_g)


def _resolve_dy_once(dy: Tensor, lora_b: Tensor, xs: Tensor, db_dtype: torch.dtype | None) -> Any:
    from ..backends.cuda.kernels import lora

    problem_g = describe(_meta(dy), _meta(lora_b))
    problem_db = describe(_meta(dy), _meta(xs), transpose_a=True, out_dtype=db_dtype)
    device = dy.device.index
    try:
        kernel = lora.DyOnce(problem_g, problem_db, device)
    except GemmError:
        return None
    g_shape, db_shape, db_torch = problem_g.out_shape, problem_db.out_shape, db_dtype or dy.dtype

    def launch(dy: Tensor, lora_b: Tensor, xs: Tensor, alpha_g: float) -> Any:
        pdy, pb, pxs = dy.data_ptr(), lora_b.data_ptr(), xs.data_ptr()
        if (pdy | pb | pxs) & 15:  # a view off the kernels' 16-byte alignment: two GEMMs serve it
            return None
        g = dy.new_empty(g_shape)
        db = dy.new_empty(db_shape, dtype=db_torch)
        workspace = dy.new_empty((kernel.workspace_bytes,), dtype=torch.uint8)
        pg, pdb = g.data_ptr(), db.data_ptr()
        kernel.launch(Operands(pdy, pb, 0, pg, 0, 0, 0), Operands(pdy, pxs, pdb, pdb, 0, 0, 0), alpha_g, 1.0, 0.0,
                      workspace.data_ptr(), _raw_stream(device))  # fmt: skip
        return g, db

    return _on_device(launch, device)
