"""What ``gemmbridge info`` reports: versions, backends, devices, and a self-check per backend."""

from __future__ import annotations

import importlib
import platform
from typing import Any

import numpy as np

from . import __version__
from .backends.cpu import gelu_tanh
from .ops import matmul

FRAMEWORKS = ("numpy", "torch", "cupy", "jax", "nvmath", "cuda.bindings", "cuda.core")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"gemmbridge": __version__, "python": platform.python_version()}
    for name in FRAMEWORKS:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:
            found[name] = None
    return found


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
    ref = gelu_tanh(a @ b + bias)
    return a, b, bias, ref


def _rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) - ref) / np.linalg.norm(ref))


def check_cpu() -> dict[str, Any]:
    """fp32 matmul + bias + gelu on the CPU backend against a float64 reference."""
    a, b, bias, ref = _reference_problem(np.random.default_rng())
    f32 = np.float32
    out = matmul(a.astype(f32), b.astype(f32), bias=bias.astype(f32), epilogue="gelu")
    err = _rel_err(out, ref)
    return {"backend": "cpu", "device": "cpu", "library": f"numpy BLAS ({_blas()})", "rel_err": err, "ok": err < 1e-5}


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

        library = f"cuBLASLt {bindings.version()}"
    except Exception as error:  # the optional [cuda] extra is missing or cannot load
        return [{"backend": "cuda", "ok": False, "reason": f"cuBLASLt unavailable: {error}"}]
    results = []
    for index in range(torch.cuda.device_count()):
        a, b, bias, ref = _reference_problem(np.random.default_rng())
        device = f"cuda:{index}"
        t = [torch.from_numpy(x).to(device=device, dtype=torch.float32) for x in (a, b, bias)]
        out = matmul(t[0], t[1], bias=t[2], epilogue="gelu", allow_tf32=False).cpu().numpy()
        err = _rel_err(out, ref)
        results.append(
            {
                "backend": "cuda",
                "device": f"{device} {torch.cuda.get_device_name(index)}",
                "library": library,
                "rel_err": err,
                "ok": err < 1e-5,
            }
        )
    return results


def report() -> dict[str, Any]:
    return {"versions": versions(), "checks": [check_cpu(), *check_cuda()]}
