"""Launching the project's kernels: the only module that hands raw pointers to them.

A ``KernelPlan`` holds one problem's compiled skinny kernel, grid and parameter block (``skinny.cu``'s
``Params``: twenty-one 8-byte fields); a launch copies the block, writes the five pointers, the two
scalars and (with dropout) the seed's address, and makes one launch per outer batch offset on the caller's
stream. A launch records into a CUDA graph being captured like any kernel, and uses no workspace. A ``Launch``
is one kernel's grid, block and shared memory, launched with any packed parameter block.

**Programmatic dependent launch** (PDL, docs/kernels.md): on a GPU of compute capability 9.0 or later a kernel
is launched with ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``, so that it may start while the
kernel before it on the stream drains; every kernel waits for its predecessor (``pdl.cuh``) before it touches
memory, so the results do not depend on the overlap, and a captured launch becomes a programmatic graph edge.
``pdl`` (``GEMMBRIDGE_PDL``: "0", the default, or "1") switches it, read at each launch (a CUDA graph keeps the
kind it captured); a driver that answers ``CUDA_ERROR_NOT_SUPPORTED`` turns it off for the process. Off by default:
on an H200 a LoRA layer's skinny sequence ran 1 % faster with it without dropout and 3 % slower with dropout.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol

import numpy as np
from cuda.bindings import driver

from ....errors import OptionError, VendorError
from ....problem import Operands, Problem
from ..graphs import check, isolated
from . import compiler
from .config import Config

try:  # cuda-bindings >= 13.5: integer-handle entry points with far less Python overhead
    from cuda.bindings._v2 import driver as _v2
except ImportError:
    _v2 = None
# PDL takes cuLaunchKernelEx: the _v2 ``launch_kernel_ex`` takes the address of a CUlaunchConfig (a ``LaunchConfig``
# made once per kernel and stream, never changed), so a launch costs a dict lookup more than ``launch_kernel``;
# ``driver.cuLaunchKernelEx`` would wrap a Python CUlaunchConfig per call. Without _v2, no PDL.
_launch_v2: Any = None if _v2 is None else _v2.launch_kernel
_launch_ex: Any = None if _v2 is None else _v2.launch_kernel_ex
_NOT_SUPPORTED: tuple[type[Exception], ...] = () if _v2 is None else (_v2.NotSupportedError,)

_ALPHA, _BETA = 17, 18  # float64 slots of the parameter block
_SEED = 19  # dropout: the seed's address (slot 20: ceil(keep · 65536), fixed per plan)
_SMEM_ATTRIBUTE = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_DEFAULT_SMEM = 48 * 1024
_PDL_ARCH = 90  # griddepcontrol: sm_90 and later
_MAX_STREAMS = 64  # launch configurations kept per kernel (one per stream it ran on)

_setting = os.environ.get("GEMMBRIDGE_PDL", "0")
if _setting not in ("0", "1"):
    raise OptionError(f"GEMMBRIDGE_PDL must be '0' or '1', not {_setting!r}")
pdl = _setting == "1"  # programmatic dependent launch where the GPU and driver have it
_pdl_refused = False  # the driver answered CUDA_ERROR_NOT_SUPPORTED once: plain launches from then on


def _serialization() -> Any:
    """The launch attribute every PDL launch points at (read-only once made, kept for the process)."""
    attribute = _v2.LaunchAttribute()
    attribute.id = _v2.LaunchAttributeID.PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmatic_stream_serialization_allowed = 1
    return attribute


_SERIALIZATION: Any = None if _v2 is None else _serialization()


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


class Launch:
    """One kernel's launch: the kernel at ``address`` (``kernel``) on a ``grid`` of ``threads``-thread blocks with
    ``smem`` bytes of dynamic shared memory, for a GPU of architecture ``target``; ``what`` names the kernel and
    problem in errors. Calling it enqueues the kernel on ``stream`` with ``params``: the address of an array holding
    the address of the packed parameter block (the kernels take one struct)."""

    def __init__(self, address: int, grid: tuple[int, int, int], threads: int, smem: int, target: str,
                 what: str) -> None:  # fmt: skip
        self.address, self.grid, self.threads, self.smem, self.what = address, grid, threads, smem, what
        self.function = driver.CUfunction(address)  # what cuLaunchKernel takes without _v2, made once
        self.programmatic = _launch_ex is not None and int(target.removeprefix("sm_")) >= _PDL_ARCH
        self._configs: dict[int, tuple[int, Any]] = {}  # stream → (address, CUlaunchConfig), never changed once made

    def config(self, stream: int) -> tuple[int, Any]:
        """The CUlaunchConfig for ``stream`` (grid, block, shared memory and the PDL attribute) and its address; the
        caller holds the pair while it launches (another thread may drop it from the table, never change it)."""
        found = self._configs.get(stream)
        if found is None:
            made = _v2.LaunchConfig()
            made.grid_dim_x, made.grid_dim_y, made.grid_dim_z = self.grid
            made.block_dim_x, made.block_dim_y, made.block_dim_z = self.threads, 1, 1
            made.shared_mem_bytes, made.h_stream = self.smem, stream
            made.attrs, made.num_attrs = _SERIALIZATION.ptr, 1
            if len(self._configs) >= _MAX_STREAMS:
                self._configs.clear()
            found = self._configs[stream] = (made.ptr, made)
        return found

    def __call__(self, stream: int, params: int) -> None:
        global _pdl_refused
        if pdl and self.programmatic and not _pdl_refused:
            config = self._configs.get(stream) or self.config(stream)
            try:
                _launch_ex(config[0], self.address, params, 0)
                return
            except _NOT_SUPPORTED:  # a driver without PDL: plain launches from now on
                _pdl_refused = True
            except Exception as error:  # the v2 entry points raise on a driver error
                raise VendorError(f"matmul: launching {self.what} failed: {error}", str(error)) from error
        gx, gy, gz = self.grid
        if _launch_v2 is not None:
            try:
                _launch_v2(self.address, gx, gy, gz, self.threads, 1, 1, self.smem, stream, params, 0)
            except Exception as error:  # the v2 entry points raise on a driver error
                raise VendorError(f"matmul: launching {self.what} failed: {error}", str(error)) from error
        else:
            result = driver.cuLaunchKernel(self.function, gx, gy, gz, self.threads, 1, 1, self.smem,
                                           driver.CUstream(stream), params, 0)  # fmt: skip
            if result[0] != driver.CUresult.CUDA_SUCCESS:
                raise VendorError(f"matmul: launching {self.what} failed: {result[0]!r}", str(result[0]))


class KernelPlan:
    """One problem on the skinny kernel: grid, block, shared memory and the parameter block's fixed fields
    (``threshold``: ceil(keep · 65536) for a configuration with dropout)."""

    def __init__(self, problem: Problem, config: Config, device: int, target: str, described: str,
                 threshold: int = 0) -> None:  # fmt: skip
        self.config = config
        self.described = described
        self.what = f"the skinny kernel for {described}"
        a, b, c, d = problem.matrices[:4]
        k_per_split = -(-problem.k // config.splits)
        k_per_split = -(-k_per_split // config.bk) * config.bk
        self.template = np.array(
            [0, 0, 0, 0, 0, a.ld, b.ld, c.ld, d.ld, a.batch_stride, b.batch_stride, c.batch_stride, d.batch_stride,
             problem.m, problem.n, problem.k, k_per_split, 0, 0, 0, threshold],
            dtype=np.int64,
        )  # fmt: skip
        grid = (-(-problem.n // config.bn), -(-problem.m // config.bm), problem.batch_count * config.splits)
        self.enqueue = Launch(int(kernel(config, device, target)), grid, config.threads, config.smem_bytes, target,
                              self.what)  # fmt: skip
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
        address, enqueue = params.ctypes.data, self.enqueue
        for oa, ob, oc, od in self.offsets:
            block[0] = ptrs.a + oa
            block[1] = ptrs.b + ob
            block[2] = ptrs.c + oc
            block[3] = ptrs.d + od
            enqueue(stream, address)
