"""Launching the project's kernels: the only module that hands raw pointers to them.

A ``KernelPlan`` holds one problem's compiled skinny kernel, grid and parameter block (``skinny.cu``'s
``Params``: twenty-one 8-byte fields); a launch copies the block, writes the five pointers, the two
scalars and (with dropout) the seed's address, and makes one ``cuLaunchKernel`` per outer batch offset
on the caller's stream. A launch records into a CUDA graph being captured like any kernel, and uses no
workspace. ``enqueue`` launches any of the kernels with a packed parameter block.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np
from cuda.bindings import driver

from ....errors import VendorError
from ....problem import Operands, Problem
from ..graphs import check, isolated
from . import compiler
from .config import Config

try:  # cuda-bindings >= 13.5: integer-handle entry points with far less Python overhead
    from cuda.bindings._v2.driver import launch_kernel as _launch_v2
except ImportError:
    _launch_v2 = None

_ALPHA, _BETA = 17, 18  # float64 slots of the parameter block
_SEED = 19  # dropout: the seed's address (slot 20: ceil(keep · 65536), fixed per plan)
_SMEM_ATTRIBUTE = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_DEFAULT_SMEM = 48 * 1024


class Loadable(compiler.Build, Protocol):
    """A kernel to compile and load, with the dynamic shared memory its launches use."""

    @property
    def smem_bytes(self) -> int: ...


_kernels: dict[tuple[Loadable, str], Any] = {}  # (build, arch) → CUkernel (context-independent)
_ready: set[tuple[Any, int]] = set()  # (kernel, device) whose shared-memory limit is set
_lock = threading.Lock()


def kernel(config: Loadable, device: int, target: str) -> Any:
    """The loaded kernel for ``config`` (a ``Config`` or another ``Loadable``) on ``device`` of architecture
    ``target`` (``sm_90``), compiled (or read from the disk cache) the first time. Loading is ``isolated`` in the
    relaxed mode: CUDA deems it unsafe while another thread captures in its global mode, and while the caller's own
    stream captures (a plan first met inside ``torch.cuda.graph``); it touches no stream. A kernel loaded and ready
    for ``device`` is returned at once (the unfused dropout fallback asks on every call)."""
    found = _kernels.get((config, target))
    if found is not None and (config.smem_bytes <= _DEFAULT_SMEM or (found, device) in _ready):
        return found
    with _lock, isolated(driver, relaxed=True):
        found = _kernels.get((config, target))
        if found is None:
            loaded = driver.cuLibraryLoadData(compiler.cubin(config, target), None, None, 0, None, None, 0)
            if loaded[0] != driver.CUresult.CUDA_SUCCESS:  # a damaged cached cubin: compiled again, once
                loaded = driver.cuLibraryLoadData(compiler.cubin(config, target, fresh=True), None, None, 0, None,
                                                  None, 0)  # fmt: skip
            library = check(loaded, "cuLibraryLoadData")
            found = _kernels[(config, target)] = check(
                driver.cuLibraryGetKernel(library, config.kernel_name), "cuLibraryGetKernel"
            )
        if config.smem_bytes > _DEFAULT_SMEM and (found, device) not in _ready:
            check(driver.cuKernelSetAttribute(_SMEM_ATTRIBUTE, config.smem_bytes, found, device),
                  "cuKernelSetAttribute")  # fmt: skip
            _ready.add((found, device))
    return found


def enqueue(address: int, grid: tuple[int, int, int], threads: int, smem: int, stream: int, params: int,
            what: str) -> None:  # fmt: skip
    """One launch of the kernel at ``address`` on ``stream``; ``params``: the address of an array holding the address
    of the packed parameter block (the kernels take one struct); ``what`` names the kernel and problem in errors."""
    gx, gy, gz = grid
    if _launch_v2 is not None:
        try:
            _launch_v2(address, gx, gy, gz, threads, 1, 1, smem, stream, params, 0)
        except Exception as error:  # the v2 entry points raise on a driver error
            raise VendorError(f"matmul: launching {what} failed: {error}", str(error)) from error
    else:
        result = driver.cuLaunchKernel(driver.CUfunction(address), gx, gy, gz, threads, 1, 1, smem,
                                       driver.CUstream(stream), params, 0)  # fmt: skip
        if result[0] != driver.CUresult.CUDA_SUCCESS:
            raise VendorError(f"matmul: launching {what} failed: {result[0]!r}", str(result[0]))


class KernelPlan:
    """One problem on the skinny kernel: grid, block, shared memory and the parameter block's fixed fields
    (``threshold``: ceil(keep · 65536) for a configuration with dropout)."""

    def __init__(self, problem: Problem, config: Config, device: int, target: str, described: str,
                 threshold: int = 0) -> None:  # fmt: skip
        self.config = config
        self.described = described
        self.what = f"the skinny kernel for {described}"
        self.address = int(kernel(config, device, target))
        a, b, c, d = problem.matrices[:4]
        k_per_split = -(-problem.k // config.splits)
        k_per_split = -(-k_per_split // config.bk) * config.bk
        self.template = np.array(
            [0, 0, 0, 0, 0, a.ld, b.ld, c.ld, d.ld, a.batch_stride, b.batch_stride, c.batch_stride, d.batch_stride,
             problem.m, problem.n, problem.k, k_per_split, 0, 0, 0, threshold],
            dtype=np.int64,
        )  # fmt: skip
        self.grid = (-(-problem.n // config.bn), -(-problem.m // config.bm), problem.batch_count * config.splits)
        self.threads, self.smem = config.threads, config.smem_bytes  # read on every launch
        sizes = (problem.itemsize, problem.itemsize, problem.result_itemsize, problem.result_itemsize)
        self.offsets = tuple(tuple(o * s for o, s in zip(offs[:4], sizes)) for offs in problem.outer_offsets)

    def launch(self, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int, seed: int = 0) -> None:
        """Enqueue the product on ``stream`` (``workspace`` is unused: the cluster reduces in shared memory;
        ``seed``: the address of the dropout's 64-bit seed, for a configuration with dropout)."""
        block = self.template.copy()
        scalars = block.view(np.float64)
        scalars[_ALPHA] = alpha
        scalars[_BETA] = beta
        block[4] = ptrs.bias
        if seed:
            block[_SEED] = seed
        params = np.array([block.ctypes.data], dtype=np.uint64)
        address = params.ctypes.data
        for oa, ob, oc, od in self.offsets:
            block[0] = ptrs.a + oa
            block[1] = ptrs.b + ob
            block[2] = ptrs.c + oc
            block[3] = ptrs.d + od
            enqueue(self.address, self.grid, self.threads, self.smem, stream, address, self.what)
