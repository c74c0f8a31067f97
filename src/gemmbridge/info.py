"""What ``gemmbridge info`` reports: versions, backends, devices, and a self-check per backend."""

from __future__ import annotations

import ctypes.util
import getpass
import importlib
import os
import platform
import tempfile
from typing import Any

import numpy as np

from . import __version__
from .errors import BackendUnavailableError, OptionError
from .ops import matmul
from .reference import GELU_TOLERANCE, TOLERANCE, reference, rel_err

FRAMEWORKS = ("numpy", "torch", "cupy", "jax", "nvmath", "triton", "cuda.bindings", "cuda.core")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"gemmbridge": __version__, "python": platform.python_version()}
    for name in FRAMEWORKS:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:
            found[name] = None
    return found


def _cuda_version_text(value: int) -> str:
    """CUDA's 1000·major + 10·minor encoding (13000 → 13.0)."""
    return f"{value // 1000}.{value % 1000 // 10}"


def _cublaslt_version_text(value: int) -> str:
    """cuBLAS's 10000·major + 100·minor + patch encoding (130100 → 13.1.0)."""
    return f"{value // 10000}.{value // 100 % 100}.{value % 100}"


def _torch_cuda_missing() -> str | None:
    """None when torch is installed and sees a CUDA device, else what is missing."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def torch_sees_cuda() -> bool:
    """Whether torch is installed and sees a CUDA device (the default device of bench and stress)."""
    return _torch_cuda_missing() is None


def resolve_device(name: str | None) -> str:
    """The device of ``bench`` and ``stress``: ``name``, or cuda when torch sees one, else cpu.

    ``cuda`` needs torch with a visible CUDA device (bench's inputs are torch tensors; stress reads device
    memory through torch): without one, a ``BackendUnavailableError`` says what is missing.
    """
    if name is None:
        return "cuda" if torch_sees_cuda() else "cpu"
    if name not in ("cpu", "cuda"):
        raise OptionError(f"--device {name!r}: choose cpu or cuda")
    missing = _torch_cuda_missing() if name == "cuda" else None
    if missing:
        raise BackendUnavailableError(f"--device cuda needs torch with a visible CUDA device: {missing}")
    return name


def cuda_versions() -> dict[str, str | None]:
    """CUDA driver, runtime and cuBLASLt versions; nothing CUDA is loaded where no driver is found."""
    found: dict[str, str | None] = {"cuda_driver": None, "cuda_runtime": None, "cublasLt": None}
    if not torch_sees_cuda() and ctypes.util.find_library("cuda") is None:
        found["cuda_note"] = "no CUDA driver found"
        return found
    try:
        from cuda.bindings import driver, runtime

        err, value = driver.cuDriverGetVersion()
        if err == driver.CUresult.CUDA_SUCCESS:
            found["cuda_driver"] = _cuda_version_text(value)
        err, value = runtime.cudaRuntimeGetVersion()
        if err == runtime.cudaError_t.cudaSuccess:
            found["cuda_runtime"] = _cuda_version_text(value)
    except Exception as error:  # cuda-bindings missing or its libraries cannot load
        found["cuda_note"] = f"cuda-bindings: {type(error).__name__}: {error}"
    try:
        from .backends.cuda import bindings

        found["cublasLt"] = _cublaslt_version_text(bindings.version())
    except Exception:
        pass
    try:
        import torch

        found["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return found


def cache_locations() -> list[dict[str, Any]]:
    """Where gemmbridge and the libraries under it keep caches (none of them is created here)."""
    from .ops import PLAN_CACHE_SIZE

    home = os.path.expanduser("~")
    env = os.environ.get
    try:
        user = getpass.getuser()
    except Exception:
        user = "user"
    paths = {
        "triton kernels": env("TRITON_CACHE_DIR") or os.path.join(env("TRITON_HOME") or home, ".triton", "cache"),
        "cuda jit (PTX → SASS)": env("CUDA_CACHE_PATH") or os.path.join(home, ".nv", "ComputeCache"),
        "cupy kernels": env("CUPY_CACHE_DIR") or os.path.join(home, ".cupy", "kernel_cache"),
        "torch inductor": env("TORCHINDUCTOR_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}"),
        "jax compilation": env("JAX_COMPILATION_CACHE_DIR"),
    }
    from . import tuning

    tuned = tuning.cache_dir() if tuning.enabled else "off (GEMMBRIDGE_TUNING_CACHE=0)"
    caches: list[dict[str, Any]] = [{
        "name": "gemmbridge plans",
        "location": f"in memory, shared by threads, at most {PLAN_CACHE_SIZE} problems",
        "exists": None,
    }, {
        "name": "gemmbridge tuning",
        "location": tuned,
        "exists": os.path.isdir(tuned) if tuning.enabled else None,
    }, {
        "name": "gemmbridge kernels (cubins)",
        "location": os.path.join(tuning.cache_dir(), "kernels"),
        "exists": os.path.isdir(os.path.join(tuning.cache_dir(), "kernels")),
    }]  # fmt: skip
    for name, path in paths.items():
        exists = os.path.isdir(path) if path else None
        caches.append({"name": name, "location": path or "off (not configured)", "exists": exists})
    return caches


def _blas() -> str:
    try:
        config: Any = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:
        return "unknown"


def _reference_problem(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    a = rng.standard_normal((96, 80))
    b = rng.standard_normal((80, 72))
    bias = rng.standard_normal(72)
    return a, b, bias, reference(a, b, bias=bias, epilogue="gelu")


def check_cpu() -> dict[str, Any]:
    """fp32 matmul + bias + gelu on the CPU backend against a float64 reference."""
    a, b, bias, ref = _reference_problem(np.random.default_rng())
    f32 = np.float32
    out = matmul(a.astype(f32), b.astype(f32), bias=bias.astype(f32), epilogue="gelu")
    err = rel_err(out, ref)
    ok = err < TOLERANCE["float32"]
    return {"backend": "cpu", "device": "cpu", "library": f"numpy BLAS ({_blas()})", "rel_err": err, "ok": ok}


def check_cuda() -> list[dict[str, Any]]:
    """The same check on every CUDA device, through torch; a skipped row when there is none."""
    try:
        import torch

        if not torch.cuda.is_available():
            return [{"backend": "cuda", "ok": None, "reason": "no CUDA device visible to torch"}]
    except ImportError:
        return [{"backend": "cuda", "ok": None, "reason": "torch with CUDA is not installed"}]
    try:
        from .backends.cuda import bindings

        library = f"cuBLASLt {_cublaslt_version_text(bindings.version())}"
    except Exception as error:  # the optional [cuda] extra is missing or cannot load
        return [{"backend": "cuda", "ok": False, "reason": f"cuBLASLt unavailable: {error}"}]
    results = []
    for index in range(torch.cuda.device_count()):
        a, b, bias, ref = _reference_problem(np.random.default_rng())
        device = f"cuda:{index}"
        name = f"{device} {torch.cuda.get_device_name(index)}"
        try:
            t = [torch.from_numpy(x).to(device=device, dtype=torch.float32) for x in (a, b, bias)]
            out = matmul(t[0], t[1], bias=t[2], epilogue="gelu", allow_tf32=False).cpu().numpy()
        except Exception as error:  # reported as this device's failed check, not as a crash of info
            reason = f"{type(error).__name__}: {error}"
            results.append({"backend": "cuda", "device": name, "ok": False, "reason": reason})
            continue
        err = rel_err(out, ref)
        results.append(
            {
                "backend": "cuda",
                "device": name,
                "library": library,
                "rel_err": err,
                "ok": err < GELU_TOLERANCE["float32"],  # cuBLASLt's fused GELU: about 1e-5 in float32
            }
        )
    return results


def report() -> dict[str, Any]:
    return {
        "versions": versions(),
        "cuda": cuda_versions(),
        "checks": [check_cpu(), *check_cuda()],
        "caches": cache_locations(),
    }
