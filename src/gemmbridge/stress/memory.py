"""Memory as the stress test samples it, and the growth it allows.

A sample is taken after ``gc.collect()``, ``malloc_trim`` and emptying the frameworks' caching allocators:
host RSS, the plan cache's size and, on CUDA, the allocators' live bytes and device memory in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys

from ..ops import cache_size
from .options import Plan, StressOptions

MIB = 1 << 20
ALLOCATORS = {"torch": "torch_allocated", "cupy": "cupy_used"}  # a framework's caching allocator: its live bytes


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so that RSS shows live memory."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def host_rss() -> int:
    """Resident set size in bytes (/proc/self/statm; else the peak from ``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def sample(device: str, frameworks: tuple[str, ...] | list[str], clear_jax: bool = False) -> dict[str, int]:
    """Memory now, after collecting garbage and emptying the caching allocators.

    ``clear_jax``: empty JAX's caches of compiled executables first (one per new shape and dtype), which keeps
    a run whose every call is a new problem bounded; with a bounded set they stay, warm (see ``options.Plan``).
    """
    if clear_jax and "jax" in frameworks:
        import jax

        jax.clear_caches()
    gc.collect()
    _malloc_trim()
    found = {"host_rss": host_rss(), "plan_cache": cache_size()}
    if device != "cuda":
        return found
    if "cupy" in frameworks:
        import cupy

        cupy.cuda.Device().synchronize()
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        found[ALLOCATORS["cupy"]] = int(pool.used_bytes())
        free, total = cupy.cuda.runtime.memGetInfo()
        found["device_used"] = int(total - free)
    with contextlib.suppress(ImportError):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if "torch" in frameworks:
            found[ALLOCATORS["torch"]] = int(torch.cuda.memory_allocated())
        free, total = torch.cuda.mem_get_info()  # after torch's cache is emptied
        found["device_used"] = int(total - free)
    return found


def tolerances(options: StressOptions, plan: Plan) -> dict[str, int | None]:
    """Allowed growth after the warm-up, in bytes, of what this run samples; None: reported, not judged
    (host RSS while per-shape caches still meet new problems: ``Plan.rss_unjudged``)."""
    rss = None if plan.rss_unjudged else int(options.rss_tolerance_mb * MIB)
    limits: dict[str, int | None] = {"host_rss": rss}
    if plan.device == "cuda":  # the keys ``sample`` reads for these frameworks (CUDA runs have torch: resolve_device)
        limits.update({key: 0 for name, key in ALLOCATORS.items() if name in plan.frameworks})
        limits["device_used"] = int(options.device_tolerance_mb * MIB)
    return limits


def mib(n: int) -> str:
    """A signed size: MiB from 64 KiB up, else bytes."""
    return f"{n / MIB:+.2f} MiB" if abs(n) >= 1 << 16 else f"{n:+d} B"
