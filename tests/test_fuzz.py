"""Property fuzz: random GEMM problems against a float64 reference.

Shapes include 0 and 1, batch dims broadcast, transposes, strided, offset and
negative-stride views, every dtype, c/alpha/beta, bias and epilogues, and out=.
``GEMMBRIDGE_FUZZ_CPU`` / ``GEMMBRIDGE_FUZZ_GPU`` set the number of problems
(defaults 10,000 and 2,000); ``GEMMBRIDGE_FUZZ_SEED`` fixes the seed (printed).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import pytest
from conftest import Framework
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import gemmbridge as gb
from gemmbridge.reference import gelu

SEED = int(os.environ.get("GEMMBRIDGE_FUZZ_SEED", random.randrange(2**32)))
TOL = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
COUNTS: dict[str, int] = {}


@st.composite
def problems(draw: st.DrawFn, layouts: tuple[str, ...]) -> dict:
    dims = st.integers(0, 9)
    m, n, k = draw(dims), draw(dims), draw(dims)
    batch = draw(st.lists(st.integers(0, 3), max_size=2))
    a_vec = not batch and draw(st.booleans()) and draw(st.booleans())
    b_vec = not batch and draw(st.booleans()) and draw(st.booleans())

    def operand_batch() -> tuple[int, ...]:
        keep = draw(st.integers(0, len(batch)))
        return tuple(1 if draw(st.booleans()) else d for d in batch[len(batch) - keep :])

    c_kind = draw(st.sampled_from(["none", "c", "c-broadcast"]))
    return {
        "dtype": draw(st.sampled_from(["float64", "float32", "float16", "bfloat16"])),
        "a_shape": (k,) if a_vec else operand_batch() + (m, k),
        "b_shape": (k,) if b_vec else operand_batch() + (k, n),
        "transpose_a": not a_vec and draw(st.booleans()),
        "transpose_b": not b_vec and draw(st.booleans()),
        "a_layout": draw(st.sampled_from(layouts)),
        "b_layout": draw(st.sampled_from(layouts)),
        "c": c_kind,
        "alpha": draw(st.sampled_from([1.0, -0.5, 2.0])),
        "beta": draw(st.sampled_from([1.0, 0.0, 0.25])),
        "bias": draw(st.booleans()),
        "epilogue": draw(st.sampled_from(["none", "relu", "gelu"])),
        "out": draw(st.sampled_from(["none", "contiguous", "transposed"])),
    }


def _swap_last(shape: tuple[int, ...], swap: bool) -> tuple[int, ...]:
    return shape[:-2] + (shape[-1], shape[-2]) if swap and len(shape) >= 2 else shape


def _round(x: np.ndarray, dtype: str, fw: Framework) -> np.ndarray:
    return fw.to_numpy64(fw.from_numpy(x, dtype))


def _fit(layout: str, x: np.ndarray) -> str:
    """The layout, or contiguous where it needs more dims than ``x`` has."""
    return layout if x.ndim >= 2 or layout != "transposed" else "contiguous"


def check_problem(fw: Framework, p: dict, rng: np.random.Generator) -> None:
    dtype = p["dtype"]
    # the stored arrays hold op(x) transposed back when transpose_x is set
    a64 = _round(rng.standard_normal(_swap_last(p["a_shape"], p["transpose_a"])), dtype, fw)
    b64 = _round(rng.standard_normal(_swap_last(p["b_shape"], p["transpose_b"])), dtype, fw)
    a = fw.view(a64, dtype, _fit(p["a_layout"], a64), rng)
    b = fw.view(b64, dtype, _fit(p["b_layout"], b64), rng)
    lhs = np.swapaxes(a64, -1, -2) if p["transpose_a"] else a64
    rhs = np.swapaxes(b64, -1, -2) if p["transpose_b"] else b64
    try:
        ref = np.matmul(lhs, rhs) * p["alpha"]
        # the GEMM error bound scales with |alpha|·|A|@|B| + |beta|·|c| + |bias|, not with |ref|
        # (a dot product that cancels to ~0 is ill-conditioned, whatever the library)
        magnitude = np.matmul(np.abs(lhs), np.abs(rhs)) * abs(p["alpha"])
    except ValueError:
        with pytest.raises(gb.ShapeError):
            gb.matmul(a, b, transpose_a=p["transpose_a"], transpose_b=p["transpose_b"])
        return
    kwargs: dict = {"transpose_a": p["transpose_a"], "transpose_b": p["transpose_b"], "alpha": p["alpha"]}
    if p["c"] != "none":
        c_shape = ref.shape if p["c"] == "c" or ref.ndim < 3 else (1,) + ref.shape[1:]
        c64 = _round(rng.standard_normal(c_shape), dtype, fw)
        kwargs.update(c=fw.from_numpy(c64, dtype), beta=p["beta"])
        ref = ref + p["beta"] * c64
        magnitude = magnitude + abs(p["beta"]) * np.abs(c64)
    n = ref.shape[-1] if len(p["b_shape"]) > 1 else 1
    if p["bias"] and len(p["b_shape"]) > 1:
        bias64 = _round(rng.standard_normal(n), dtype, fw)
        kwargs["bias"] = fw.from_numpy(bias64, dtype)
        ref = ref + bias64
        magnitude = magnitude + np.abs(bias64)
    if p["epilogue"] == "relu":
        ref = np.maximum(ref, 0.0)
    elif p["epilogue"] == "gelu":
        ref = gelu(np.asarray(ref, dtype=np.float64))
    kwargs["epilogue"] = p["epilogue"]
    out = None
    if p["out"] != "none" and fw.mutable and ref.ndim:
        layout = p["out"] if ref.ndim >= 2 else "contiguous"
        _, out = fw.out_view(ref.shape, dtype, layout)[:2]
        kwargs["out"] = out
    result = gb.matmul(a, b, **kwargs)
    if out is not None:
        assert result is out
    got = fw.to_numpy64(result)
    assert got.shape == np.shape(ref)
    assert np.isfinite(got).all(), "unwritten (NaN) or non-finite elements"
    scale = np.linalg.norm(magnitude)
    err = np.linalg.norm(got - ref) / scale if scale else np.abs(got).max(initial=0.0)
    assert err < TOL[dtype], f"{p}: relative error {err:.3g}"


def _run(fw: Framework, layouts: tuple[str, ...], examples: int, label: str) -> None:
    rng = np.random.default_rng(SEED)

    @seed(SEED)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(problems(layouts))
    def fuzz(p: dict) -> None:
        COUNTS[label] = COUNTS.get(label, 0) + 1
        check_problem(fw, p, rng)

    fuzz()


def test_fuzz_cpu(summary_line: Callable[[str], None]) -> None:
    examples = int(os.environ.get("GEMMBRIDGE_FUZZ_CPU", 10_000))
    _run(Framework("numpy", "cpu"), ("contiguous", "transposed", "row_strided", "col_strided", "offset", "negative"),
         examples, "cpu/numpy")  # fmt: skip
    summary_line(f"fuzz cpu/numpy: {COUNTS['cpu/numpy']} problems, seed {SEED}, 0 failures")


@pytest.mark.gpu
def test_fuzz_gpu(summary_line: Callable[[str], None]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    examples = int(os.environ.get("GEMMBRIDGE_FUZZ_GPU", 2_000))
    _run(Framework("torch", "cuda"), ("contiguous", "transposed", "row_strided", "col_strided", "offset"),
         examples, "gpu/torch")  # fmt: skip
    summary_line(f"fuzz gpu/torch: {COUNTS['gpu/torch']} problems, seed {SEED}, 0 failures")
