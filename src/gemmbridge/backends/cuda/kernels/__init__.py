"""The project's own kernels for bandwidth-bound ("skinny") GEMMs, chosen over cuBLASLt where they win.

``config.py`` says which problems they serve and with which tile (pure Python), ``skinny.cu`` is the
kernel, ``compiler.py`` compiles it with NVRTC and caches it on disk, ``launch.py`` launches it.
``config_for`` is the dispatch, on a GPU of compute capability 9.0 or later, by ``mode``
(``GEMMBRIDGE_KERNELS`` or ``gemmbridge.set_kernels``): "auto" (the default) takes the kernel where
the measured rule says it beats cuBLASLt (``config.choose``), "on" wherever it can serve the problem
(``config.configure``; for tests and benchmarks), "off" never. The rule and its measurements:
``docs/kernels.md``.
"""

from __future__ import annotations

import os
import warnings

from cuda.bindings import driver

from ....errors import GemmError, OptionError
from ....problem import Problem
from ..graphs import check
from .config import Config, choose, configure
from .launch import KernelPlan

MODES = ("auto", "on", "off")
mode = os.environ.get("GEMMBRIDGE_KERNELS", "auto")
if mode not in MODES:
    raise OptionError(f"GEMMBRIDGE_KERNELS must be one of {MODES}, not {mode!r}")

_devices: dict[int, tuple[int, str, int]] = {}  # device → (compute capability major, architecture, SM count)
_failed = False  # the kernels could not be built here (no NVRTC, say): cuBLASLt serves every problem


def _device(device: int) -> tuple[int, str, int]:
    found = _devices.get(device)
    if found is None:
        attr = driver.CUdevice_attribute
        major, minor, sms = (
            int(check(driver.cuDeviceGetAttribute(a, device), "cuDeviceGetAttribute"))
            for a in (
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
        )
        found = _devices[device] = (major, f"sm_{major}{minor}", sms)
    return found


def config_for(problem: Problem, device: int) -> Config | None:
    """The kernel configuration that serves ``problem`` on ``device``, or None (cuBLASLt)."""
    if mode == "off" or _failed:
        return None
    major, _, sms = _device(device)
    if major < 9:
        return None
    return choose(problem, sms) if mode == "auto" else configure(problem, sms)


def plan_for(config: Config, problem: Problem, device: int, described: str) -> KernelPlan | None:
    """A plan on the skinny kernel, or None after warning once when the kernel cannot be built here."""
    global _failed
    try:
        return KernelPlan(problem, config, device, _device(device)[1], described)
    except (GemmError, ImportError, OSError, RuntimeError) as error:
        _failed = True
        warnings.warn(f"gemmbridge: the skinny-GEMM kernels are unavailable, cuBLASLt serves every problem: {error}",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
