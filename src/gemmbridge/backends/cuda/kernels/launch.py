"""Launching the skinny kernel: the only module that hands raw pointers to the project's own kernels.

A ``KernelPlan`` holds one problem's compiled kernel, grid and parameter block (``skinny.cu``'s
``Params``: nineteen 8-byte fields); a launch copies the block, writes the five pointers and the two
scalars, and makes one ``cuLaunchKernel`` per outer batch offset on the caller's stream. A launch
records into a CUDA graph being captured like any kernel, and uses no workspace.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from cuda.bindings import driver

from ....errors import VendorError
from ....problem import Operands, Problem
from ..graphs import check
from . import compiler
from .config import Config

try:  # cuda-bindings >= 13.5: integer-handle entry points with far less Python overhead
    from cuda.bindings._v2.driver import launch_kernel as _launch_v2
except ImportError:
    _launch_v2 = None

_ALPHA, _BETA = 17, 18  # float64 slots of the parameter block
_SMEM_ATTRIBUTE = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_DEFAULT_SMEM = 48 * 1024

_kernels: dict[tuple[Config, str], Any] = {}  # (config, arch) → CUkernel (context-independent)
_ready: set[tuple[Any, int]] = set()  # (kernel, device) whose shared-memory limit is set
_lock = threading.Lock()


def kernel(config: Config, device: int, target: str) -> Any:
    """The loaded kernel for ``config`` on ``device`` of architecture ``target`` (``sm_90``), compiled (or read
    from the disk cache) the first time."""
    with _lock:
        found = _kernels.get((config, target))
        if found is None:
            loaded = driver.cuLibraryLoadData(compiler.cubin(config, target), None, None, 0, None, None, 0)
            if loaded[0] != driver.CUresult.CUDA_SUCCESS:  # a damaged cached cubin: compiled again, once
                loaded = driver.cuLibraryLoadData(compiler.cubin(config, target, fresh=True), None, None, 0, None,
                                                  None, 0)  # fmt: skip
            library = check(loaded, "cuLibraryLoadData")
            found = _kernels[(config, target)] = check(
                driver.cuLibraryGetKernel(library, compiler.KERNEL_NAME), "cuLibraryGetKernel"
            )
        if config.smem_bytes > _DEFAULT_SMEM and (found, device) not in _ready:
            check(driver.cuKernelSetAttribute(_SMEM_ATTRIBUTE, config.smem_bytes, found, device),
                  "cuKernelSetAttribute")  # fmt: skip
            _ready.add((found, device))
    return found


class KernelPlan:
    """One problem on the skinny kernel: grid, block, shared memory and the parameter block's fixed fields."""

    def __init__(self, problem: Problem, config: Config, device: int, target: str, described: str) -> None:
        self.config = config
        self.described = described
        self.address = int(kernel(config, device, target))
        self.function = driver.CUfunction(self.address)
        a, b, c, d = problem.matrices[:4]
        k_per_split = -(-problem.k // config.splits)
        k_per_split = -(-k_per_split // config.bk) * config.bk
        self.template = np.array(
            [0, 0, 0, 0, 0, a.ld, b.ld, c.ld, d.ld, a.batch_stride, b.batch_stride, c.batch_stride, d.batch_stride,
             problem.m, problem.n, problem.k, k_per_split, 0, 0],
            dtype=np.int64,
        )  # fmt: skip
        self.grid = (-(-problem.n // config.bn), -(-problem.m // config.bm), problem.batch_count * config.splits)
        self.threads, self.smem = config.threads, config.smem_bytes  # read on every launch
        sizes = (problem.itemsize, problem.itemsize, problem.result_itemsize, problem.result_itemsize)
        self.offsets = tuple(tuple(o * s for o, s in zip(offs[:4], sizes)) for offs in problem.outer_offsets)

    def launch(self, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int) -> None:
        """Enqueue the product on ``stream`` (``workspace`` is unused: the cluster reduces in shared memory)."""
        block = self.template.copy()
        scalars = block.view(np.float64)
        scalars[_ALPHA] = alpha
        scalars[_BETA] = beta
        block[4] = ptrs.bias
        params = np.array([block.ctypes.data], dtype=np.uint64)
        address = params.ctypes.data
        gx, gy, gz = self.grid
        threads, smem = self.threads, self.smem
        for oa, ob, oc, od in self.offsets:
            block[0] = ptrs.a + oa
            block[1] = ptrs.b + ob
            block[2] = ptrs.c + oc
            block[3] = ptrs.d + od
            if _launch_v2 is not None:
                try:
                    _launch_v2(self.address, gx, gy, gz, threads, 1, 1, smem, stream, address, 0)
                except Exception as error:  # the v2 entry points raise on a driver error
                    raise VendorError(f"matmul: launching the skinny kernel failed for {self.described}: {error}",
                                      str(error)) from error  # fmt: skip
            else:
                result = driver.cuLaunchKernel(self.function, gx, gy, gz, threads, 1, 1, smem, driver.CUstream(stream),
                                               address, 0)  # fmt: skip
                if result[0] != driver.CUresult.CUDA_SUCCESS:
                    raise VendorError(f"matmul: launching the skinny kernel failed for {self.described}: "
                                      f"{result[0]!r}", str(result[0]))  # fmt: skip
