"""The CUDA backend's side of the tuning cache (``gemmbridge.tuning``): its keys, restoring and storing choices.

The file is keyed by the device (GPU name, SM count, compute capability, driver, cuBLASLt version);
an entry by the problem as cuBLASLt is told it (layouts, dtypes, batch, epilogue, aux ld), the
pointer alignments and TF32 — what makes one ``LtPlan``. A cuBLASLt choice is restored from its
algorithm bytes and used only when they still read as its configuration and ``matmul_algo_check``
accepts them; another backend's choice only through its registered source (``autotune.add_source``).
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Any

from cuda.bindings import driver

from ... import tuning
from ...problem import Operands, Problem
from . import algos, autotune, bindings
from .autotune import Candidate, Tuned
from .bindings import LtPlan
from .graphs import check

_devices: dict[int, dict[str, Any] | None] = {}


def _kernel_module_version() -> str | None:
    """The NVIDIA kernel driver's version (``580.159.04``) on Linux, else None."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", f.readline())
    except OSError:
        return None
    return found.group(1) if found else None


def _query(device: int) -> dict[str, Any]:
    attr = driver.CUdevice_attribute
    check(driver.cuInit(0), "cuInit")  # asked before any framework touched the GPU, the driver is not initialised yet
    dev = check(driver.cuDeviceGet(device), "cuDeviceGet")
    name = check(driver.cuDeviceGetName(256, dev), "cuDeviceGetName").split(b"\0")[0].decode()

    def get(what: Any) -> int:
        return int(check(driver.cuDeviceGetAttribute(what, dev), "cuDeviceGetAttribute"))

    return {
        "name": name,
        "sms": get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        "capability": f"{get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)}."
        f"{get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)}",
        "driver": _kernel_module_version(),
        "cuda_driver": int(check(driver.cuDriverGetVersion(), "cuDriverGetVersion")),
        "cublasLt": int(bindings.version()),
    }


def device_key(device: int) -> dict[str, Any] | None:
    """What names ``device``'s tuning file; None when the driver cannot say (then no cache is used)."""
    if device not in _devices:
        try:
            _devices[device] = _query(device)
        except Exception:  # a driver that cannot say: no tuning cache, never a failed call
            _devices[device] = None
    return _devices[device]


def entry_key(plan: LtPlan) -> str:
    p = plan.problem

    def layout(lay: Any) -> list:
        return [lay.rows, lay.cols, lay.ld, lay.transpose, lay.batch_stride]

    return tuning.problem_key({
        "a": layout(p.a), "b": layout(p.b), "c": layout(p.c), "d": layout(p.d), "dtype": p.a_dtype,
        "result_dtype": p.d_dtype, "batch": p.batch_count, "epilogue": p.epilogue, "aux_ld": p.aux_ld,
        "alignments": list(plan.alignments), "tf32": plan.tf32,
    })  # fmt: skip


def launcher(candidate: Candidate) -> Any:
    """``candidate`` as the hot path launches a plan: ``launch(plan, ptrs, alpha, beta, workspace, stream)``."""
    run = candidate.launch

    def launch(plan: LtPlan, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int) -> None:
        run(ptrs, alpha, beta, workspace, stream)

    return launch


def _file(device: int) -> tuning.TuningFile | None:
    key = device_key(device)
    return None if key is None else tuning.file_for(key)


def has_entries(device: int) -> bool:
    """True when the tuning cache holds any choice for ``device``."""
    file = _file(device)
    return file is not None and bool(file.entries())


def restore(plan: LtPlan, problem: Problem, device: int) -> Any:
    """The launch of the cached choice for ``plan`` (selecting it when it is cuBLASLt's), or None."""
    file = _file(device)
    entry = None if file is None else file.get(entry_key(plan))
    if entry is None:
        return None
    choice = entry["choice"]
    if choice["backend"] == "cublaslt":
        algo = algos.restore(plan, choice)
        if algo is None:
            return None
        plan.use(algo)
        return bindings.launch
    source = autotune.sources.get(choice["backend"])
    found = None if source is None else source.restore(problem, autotune.our_alignments(plan), plan.tf32, choice)
    return None if found is None else launcher(found)


def store(plan: LtPlan, device: int, tuned: Tuned, described: str) -> None:
    """Keep what a tuning chose for ``plan``'s problem."""
    file = _file(device)
    if file is None:
        return
    timings = {"first_ms": tuned.first_ms, "chosen_ms": tuned.chosen_ms, "noise": tuned.noise}
    file.put({entry_key(plan): {
        "choice": tuned.chosen.payload,
        "timings": {k: v for k, v in timings.items() if math.isfinite(v)},
        "chosen": tuned.chosen.name,
        "method": tuned.method,
        "candidates": len(tuned.timings),
        "problem": described,
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }})  # fmt: skip


def forget(plan: LtPlan, device: int) -> None:
    """Drop the cached choice for ``plan``'s problem."""
    file = _file(device)
    if file is not None:
        file.put({}, remove=(entry_key(plan),))
