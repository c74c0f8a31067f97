"""The project's own kernels for bandwidth-bound ("skinny") GEMMs, chosen over cuBLASLt where they win.

``config.py`` says which problems they serve and with which tile (pure Python), ``skinny.cu`` is the
kernel, ``compiler.py`` compiles it with NVRTC and caches it on disk, ``launch.py`` launches it.
``config_for`` is the dispatch, on a GPU of compute capability 9.0 or later, by ``mode``
(``GEMMBRIDGE_KERNELS`` or ``gemmbridge.set_kernels``): "auto" (the default) takes the kernel where
the measured rule says it beats cuBLASLt (``config.choose``), "on" wherever it can serve the problem
(``config.configure``; for tests and benchmarks), "off" never. The rule and its measurements:
``docs/kernels.md``. ``dropout.py`` runs the kernel with a dropout mask inside, for the LoRA layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

from ....errors import BackendUnavailableError, GemmError, OptionError
from ....problem import Problem
from .. import autotune, tuning_cache
from . import compiler
from .config import Config, candidates, choose, configure, eligible, fits_grid
from .launch import KernelPlan

MODES = ("auto", "on", "off")
mode = os.environ.get("GEMMBRIDGE_KERNELS", "auto")
if mode not in MODES:
    raise OptionError(f"GEMMBRIDGE_KERNELS must be one of {MODES}, not {mode!r}")

_broken: set[Config] = set()  # configurations that could not be built or loaded here: cuBLASLt serves them


def device_info(device: int) -> tuple[int, str, int] | None:
    """(compute capability major, architecture, SM count) from the tuning cache's device query (None when the
    driver cannot say: then cuBLASLt serves everything)."""
    key = tuning_cache.device_key(device)
    if key is None:
        return None
    major, minor = key["capability"].split(".")
    return int(major), f"sm_{major}{minor}", int(key["sms"])


def usable(device: int) -> tuple[int, str, int] | None:
    """``device_info`` of ``device`` where the project's kernels may run on it (kernels not "off", compute capability
    9.0 or later), else None."""
    found = None if mode == "off" else device_info(device)
    return found if found is not None and found[0] >= 9 else None


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """The block builds or loads kernels: a failure that says they cannot run here (no NVRTC, a cubin the driver
    refuses, …) becomes BackendUnavailableError naming ``what``; gemmbridge's own errors pass unchanged."""
    try:
        yield
    except GemmError:
        raise
    except (ImportError, OSError, RuntimeError) as error:
        raise BackendUnavailableError(f"{what} cannot be built or loaded here: {error}") from error


def config_for(problem: Problem, device: int) -> Config | None:
    """The kernel configuration that serves ``problem`` on ``device``, or None (cuBLASLt)."""
    found = usable(device)
    if found is None:
        return None
    config = choose(problem, found[2]) if mode == "auto" else configure(problem, found[2])
    return None if config in _broken else config


def plan_for(config: Config, problem: Problem, device: int, described: str) -> autotune.Candidate | None:
    """``config`` on the skinny kernel as a launchable candidate, or None after warning once when that
    configuration cannot be built or loaded here (no NVRTC, more shared memory than the GPU has, …)."""
    found = device_info(device)
    if config in _broken or found is None:
        return None
    try:
        plan = KernelPlan(problem, config, device, found[1], described)
    except (GemmError, ImportError, OSError, RuntimeError) as error:
        _broken.add(config)
        warnings.warn(f"gemmbridge: the skinny-GEMM kernel {config.name} is unavailable, cuBLASLt serves its "
                      f"problems: {error}", RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    payload = {"backend": KernelSource.backend, "config": dataclasses.asdict(config),
               "source": compiler.source_digest()}  # fmt: skip
    return autotune.Candidate(f"kernel {config.name}", payload, plan.launch)


def _index(problem: Problem) -> int:
    return int(problem.device.partition(":")[2] or 0)


class KernelSource:
    """The skinny kernel's configurations as the tuner's candidates (``autotune.Source``), whatever the rule says."""

    backend = "kernel"

    def candidates(
        self, problem: Problem, alignments: tuple[int, int, int, int], tf32: bool
    ) -> list[autotune.Candidate]:
        device = _index(problem)
        found = None if min(alignments) < 16 else usable(device)
        if found is None:
            return []
        made = (plan_for(c, problem, device, f"{c.name} for {problem.m}x{problem.n}x{problem.k}")
                for c in candidates(problem, found[2]))  # fmt: skip
        return [c for c in made if c is not None]

    def restore(
        self, problem: Problem, alignments: tuple[int, int, int, int], tf32: bool, payload: dict[str, Any]
    ) -> autotune.Candidate | None:
        """The cached configuration, if it was made for this kernel source and still fits the problem (its dtypes,
        operand orders and grid) and pointers; a malformed payload is ignored, never an error."""
        try:
            config = Config(**payload["config"])
            a, b = problem.matrices.a, problem.matrices.b
            fits = (payload.get("source") == compiler.source_digest() and config.valid and eligible(problem)
                    and not config.mask and config.dtype == problem.dtype and min(alignments) >= 16
                    and config.out_f32 == (problem.result_dtype == "float32") and config.a_kcontig == a.row_major
                    and config.b_kcontig == (not b.row_major) and fits_grid(problem, config))  # fmt: skip
        except Exception:  # whatever a corrupted cache holds
            return None
        if mode == "off" or not fits:
            return None
        return plan_for(config, problem, _index(problem), f"{config.name} (tuned)")


autotune.add_source(KernelSource())
