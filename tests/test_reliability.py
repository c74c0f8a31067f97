"""Concurrency and out-of-memory behaviour."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import gemmbridge as gb
from gemmbridge.reference import GELU_TOLERANCE, TOLERANCE, reference

THREADS = 8
CALLS_PER_THREAD = 60


def _mixed_problem(rng: np.random.Generator) -> dict:
    m, n, k = (int(x) for x in rng.integers(1, 96, size=3))
    batch = () if rng.random() < 0.6 else (int(rng.integers(1, 4)),)
    return {
        "a": rng.standard_normal(batch + (m, k)),
        "b": rng.standard_normal((k, n)),
        "bias": rng.standard_normal(n) if rng.random() < 0.5 else None,
        "epilogue": ("none", "relu", "gelu")[int(rng.integers(0, 3))],
        "alpha": float(rng.choice([1.0, 0.5, -2.0])),
    }


def _reference(p: dict) -> np.ndarray:
    return reference(p["a"], p["b"], alpha=p["alpha"], bias=p["bias"], epilogue=p["epilogue"])


def _hammer(run_one, index: int, errors: list) -> None:  # type: ignore[no-untyped-def]
    """``run_one(problem, thread index, rng)`` returns (result as float64, its tolerance)."""
    rng = np.random.default_rng(index)
    try:
        for _ in range(CALLS_PER_THREAD):
            p = _mixed_problem(rng)
            got, tol = run_one(p, index, rng)
            ref = _reference(p)
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            if not err < tol:
                errors.append(f"thread {index}: relative error {err:.3g} > {tol:g}")
    except Exception as error:  # reported by the main thread
        errors.append(f"thread {index}: {error!r}")


def _run_threads(run_one) -> None:  # type: ignore[no-untyped-def]
    errors: list[str] = []
    threads = [threading.Thread(target=_hammer, args=(run_one, index, errors)) for index in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    assert errors == []


def test_threads_cpu():
    def run_one(p: dict, index: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        f32 = np.float32
        bias = None if p["bias"] is None else p["bias"].astype(f32)
        out = gb.matmul(p["a"].astype(f32), p["b"].astype(f32), bias=bias, epilogue=p["epilogue"], alpha=p["alpha"])
        return out.astype(np.float64), 1e-5

    _run_threads(run_one)


GPU_DTYPES = ("float64", "float32", "float16", "bfloat16")


@pytest.mark.gpu
def test_threads_gpu_each_with_its_own_stream():
    """8 threads, each on its own stream and (with several GPUs) spread over the devices, every dtype."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    local = threading.local()

    def run_one(p: dict, index: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        if not hasattr(local, "stream"):
            local.device = torch.device("cuda", index % torch.cuda.device_count())
            local.stream = torch.cuda.Stream(device=local.device)
        dtype = str(rng.choice(GPU_DTYPES))
        with torch.cuda.device(local.device), torch.cuda.stream(local.stream):
            arrays = {k: v for k, v in p.items() if isinstance(v, np.ndarray)}
            t = {k: torch.from_numpy(v).to(local.device, getattr(torch, dtype)) for k, v in arrays.items()}
            out = gb.matmul(t["a"], t["b"], bias=t.get("bias"), epilogue=p["epilogue"], alpha=p["alpha"],
                            allow_tf32=False)  # fmt: skip
            assert out.device == local.device
            result = out.double().cpu().numpy()  # waits for this stream only
        if dtype in ("float16", "bfloat16"):  # the reference takes the inputs as rounded
            p.update({k: v.to(torch.float64).cpu().numpy() for k, v in t.items()})
        gelu = GELU_TOLERANCE.get(dtype, 0.0) if p["epilogue"] == "gelu" else 0.0  # cuBLASLt's GELU precision
        return result, max(TOLERANCE[dtype], gelu)

    _run_threads(run_one)


@pytest.mark.gpu
def test_out_of_memory_is_clear_and_recoverable():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = torch.randn(400_000, 8, device="cuda")
    b = torch.randn(8, 400_000, device="cuda")  # the result would need 596 GiB
    with pytest.raises(gb.OutOfMemoryError, match=r"\(400000, 400000\) float32 .* does not fit in cuda:0"):
        gb.matmul(a, b)
    x, y = torch.randn(64, 32, device="cuda"), torch.randn(32, 16, device="cuda")
    got = gb.matmul(x, y, allow_tf32=False)
    assert ((got.double() - x.double() @ y.double()).norm() / (x.double() @ y.double()).norm()).item() < 1e-5
