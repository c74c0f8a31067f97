"""The GEMM contract, checked on every framework and device against a float64 numpy reference.

Each test draws fresh random data, poisons every out= with NaN, and compares
``||got - ref|| / ||ref||`` with the dtype's tolerance (``gemmbridge.reference.TOLERANCE``).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, LAYOUTS, Framework

import gemmbridge
from gemmbridge.reference import reference

TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
HALF = ("float16", "bfloat16")
EPILOGUES = ("none", "relu", "gelu")


def make(fw: Framework, rng: np.random.Generator, shape, dtype: str, layout: str = "contiguous"):
    """A random operand of ``shape`` in ``layout`` and the float64 copy of its (rounded) values."""
    x = fw.view(rng.standard_normal(shape), dtype, layout, rng)
    return x, fw.to_numpy64(x)


def check(fw: Framework, result, ref: np.ndarray, dtype: str, out=None, epilogue: str = "none") -> None:
    """Right type, device, dtype, shape; fully written (no NaN left); within the dtype's tolerance."""
    fw.type_check(result)
    if out is not None:
        assert result is out
    assert str(result.dtype).removeprefix("torch.") == dtype
    got = fw.to_numpy64(result)
    assert got.shape == ref.shape
    assert np.isfinite(got).all(), "out not fully written (NaN poison left) or non-finite result"
    scale = np.linalg.norm(ref)
    if scale == 0:
        assert (got == 0).all()
    else:
        err = np.linalg.norm(got - ref) / scale
        tol = tolerance(fw, dtype, epilogue)
        assert err < tol, f"relative error {err:.3g} >= {tol}"


def tolerance(fw: Framework, dtype: str, epilogue: str) -> float:
    """The dtype's tolerance; cuBLASLt's float64 GELU epilogue is documented at 1e-8.

    Measured 1.6e-11 to 1.3e-9 off the tanh formula (relative norm; H100 and H200, CUDA 13,
    cuBLASLt 130100): the vendor evaluates the activation with less than float64 accuracy.
    """
    if fw.device == "cuda" and dtype == "float64" and epilogue == "gelu":
        return 1e-8
    return TOL[dtype]


def needs_out(fw: Framework) -> None:
    if not fw.mutable:
        pytest.skip(f"{fw.name} arrays are immutable: out= is refused (tests/test_errors.py)")


# -- dtypes, ranks, batch broadcasting ------------------------------------------------------------------

SHAPES = [
    pytest.param((5, 7), (7, 3), id="2d"),
    pytest.param((1, 1), (1, 1), id="1x1x1"),
    pytest.param((33, 65), (65, 17), id="2d-odd-larger"),
    pytest.param((70, 1), (1, 69), id="K=1"),
    pytest.param((1, 70), (70, 1), id="M=N=1"),
    pytest.param((1, 64), (64, 67), id="M=1"),
    pytest.param((67, 64), (64, 1), id="N=1"),
    pytest.param((7,), (7, 9), id="1d@2d"),
    pytest.param((9, 7), (7,), id="2d@1d"),
    pytest.param((13,), (13,), id="1d@1d"),
    pytest.param((3, 5, 6), (3, 6, 4), id="batch"),
    pytest.param((4, 1, 5, 6), (3, 6, 7), id="broadcast-4x1-3"),
    pytest.param((2, 3, 5, 6), (6, 7), id="batch@2d"),
    pytest.param((5, 6), (2, 6, 7), id="2d@batch"),
    pytest.param((1, 5, 6), (3, 6, 4), id="broadcast-1-3"),
    pytest.param((6,), (2, 6, 4), id="1d@batch"),
    pytest.param((2, 3, 5, 6), (6,), id="batch@1d"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sa, sb", SHAPES)
def test_shapes_and_dtypes(fw, rng, dtype, sa, sb):
    a, a64 = make(fw, rng, sa, dtype)
    b, b64 = make(fw, rng, sb, dtype)
    before = fw.snapshot(a), fw.snapshot(b)
    check(fw, gemmbridge.matmul(a, b), reference(a64, b64), dtype)
    assert (fw.snapshot(a), fw.snapshot(b)) == before, "inputs were modified"


def test_broadcast_result_shape(fw, rng):
    a, a64 = make(fw, rng, (4, 1, 3, 5), "float32")
    b, b64 = make(fw, rng, (3, 5, 2), "float32")
    result = gemmbridge.matmul(a, b)
    assert tuple(result.shape) == (4, 3, 3, 2)
    check(fw, result, reference(a64, b64), "float32")


@pytest.mark.parametrize("allow_tf32", [None, False])
def test_float32_is_not_tf32_unless_asked(fw, rng, allow_tf32):
    a, a64 = make(fw, rng, (64, 65), "float32")
    b, b64 = make(fw, rng, (65, 63), "float32")
    check(fw, gemmbridge.matmul(a, b, allow_tf32=allow_tf32), reference(a64, b64), "float32")


def test_allow_tf32_true(fw, rng):
    a, a64 = make(fw, rng, (64, 65), "float32")
    b, b64 = make(fw, rng, (65, 63), "float32")
    result = gemmbridge.matmul(a, b, allow_tf32=True)
    got, ref = fw.to_numpy64(result), reference(a64, b64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-3  # tf32 is ~3e-4


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 6e-3)])
def test_half_accumulates_in_float32(fw, rng, dtype, tol):
    """Long positive sums: half accumulation would drift far past the one final rounding (2^-11, 2^-8)."""
    a = fw.from_numpy(rng.uniform(0.0, 1.0, (3, 4096)), dtype)
    b = fw.from_numpy(rng.uniform(0.0, 1.0, (4096, 5)), dtype)
    ref = fw.to_numpy64(a) @ fw.to_numpy64(b)
    got = fw.to_numpy64(gemmbridge.matmul(a, b))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol


# -- transposes and views ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (2,)], ids=["2d", "batched"])
@pytest.mark.parametrize("transpose_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("transpose_b", [False, True], ids=["b", "bT"])
def test_transpose_flags(fw, rng, dtype, batch, transpose_a, transpose_b):
    m, k, n = 7, 5, 9
    a, a64 = make(fw, rng, batch + ((k, m) if transpose_a else (m, k)), dtype)
    b, b64 = make(fw, rng, batch + ((n, k) if transpose_b else (k, n)), dtype)
    result = gemmbridge.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    assert tuple(result.shape) == batch + (m, n)
    check(fw, result, reference(a64, b64, transpose_a=transpose_a, transpose_b=transpose_b), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout_a", LAYOUTS)
@pytest.mark.parametrize("layout_b", LAYOUTS)
def test_views(fw, rng, dtype, layout_a, layout_b):
    """Transposed, strided, odd-offset, two-non-unit-stride (copied) and negative-stride views."""
    a, a64 = make(fw, rng, (6, 5), dtype, layout_a)
    b, b64 = make(fw, rng, (5, 7), dtype, layout_b)
    before = fw.snapshot(a), fw.snapshot(b)
    check(fw, gemmbridge.matmul(a, b), reference(a64, b64), dtype)
    assert (fw.snapshot(a), fw.snapshot(b)) == before, "inputs were modified"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_with_transpose_flags(fw, rng, layout):
    a, a64 = make(fw, rng, (2, 5, 6), "float64", layout)
    b, b64 = make(fw, rng, (2, 7, 5), "float64", layout)
    result = gemmbridge.matmul(a, b, transpose_a=True, transpose_b=True)
    check(fw, result, reference(a64, b64, transpose_a=True, transpose_b=True), "float64")


@pytest.mark.parametrize("layout", ["contiguous", "col_strided", "offset", "negative"])
@pytest.mark.parametrize("sa, sb", [((6,), (6, 4)), ((4, 6), (6,)), ((6,), (6,))], ids=["1d@2d", "2d@1d", "1d@1d"])
def test_vector_views(fw, rng, layout, sa, sb):
    a, a64 = make(fw, rng, sa, "float32", layout)
    b, b64 = make(fw, rng, sb, "float32", layout)
    check(fw, gemmbridge.matmul(a, b), reference(a64, b64), "float32")


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize(
    "layout", ["batch_strided", "batch_permuted", "transposed", "row_strided", "col_strided", "offset", "negative"]
)
def test_batched_views(fw, rng, dtype, layout):
    a, a64 = make(fw, rng, (3, 6, 5), dtype, layout)
    b, b64 = make(fw, rng, (3, 5, 4), dtype, layout)
    check(fw, gemmbridge.matmul(a, b), reference(a64, b64), dtype)


@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_expanded_batch(fw, rng, which):
    """A batch dim broadcast by a stride-0 view (expand / broadcast_to) reads the one matrix for every batch."""
    a1, a64 = make(fw, rng, (1, 6, 5), "float32")
    b1, b64 = make(fw, rng, (1, 5, 4), "float32")
    a = fw.broadcast_to(a1, (3, 6, 5)) if which in ("a", "both") else fw.from_numpy(np.repeat(a64, 3, 0), "float32")
    b = fw.broadcast_to(b1, (3, 5, 4)) if which in ("b", "both") else fw.from_numpy(np.repeat(b64, 3, 0), "float32")
    check(fw, gemmbridge.matmul(a, b), reference(np.repeat(a64, 3, 0), np.repeat(b64, 3, 0)), "float32")


# -- out= -----------------------------------------------------------------------------------------------

OUT_LAYOUTS = ["contiguous", "transposed", "offset", "row_strided", "col_strided", "batch_strided", "negative"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["2d", "batched"])
def test_out(fw, rng, dtype, out_layout, batch):
    """out= is written in place, completely, and nothing of its parent buffer outside it is touched."""
    needs_out(fw)
    if out_layout == "batch_strided" and not batch:
        pytest.skip("no batch dim")
    m, k, n = 5, 7, 6
    a, a64 = make(fw, rng, batch + (m, k), dtype)
    b, b64 = make(fw, rng, (k, n), dtype)
    parent, out, inside = fw.out_view(batch + (m, n), dtype, out_layout)
    result = gemmbridge.matmul(a, b, out=out)
    check(fw, result, reference(a64, b64), dtype, out=out)
    assert np.isnan(fw.to_numpy64(parent)[~inside]).all(), "wrote outside out"


@pytest.mark.parametrize("sa, sb", [((6,), (6, 4)), ((4, 6), (6,)), ((6,), (6,))], ids=["1d@2d", "2d@1d", "1d@1d"])
def test_out_vector_results(fw, rng, sa, sb):
    needs_out(fw)
    a, a64 = make(fw, rng, sa, "float32")
    b, b64 = make(fw, rng, sb, "float32")
    ref = reference(a64, b64)
    out = fw.poisoned(ref.shape, "float32")
    check(fw, gemmbridge.matmul(a, b, out=out), ref, "float32", out=out)


# -- c, alpha, beta -------------------------------------------------------------------------------------

ALPHA_BETA = [(1.0, 1.0), (0.5, -2.0), (2.0, 0.0), (-1.5, 0.25)]
C_CASES = [
    pytest.param((), (5, 6), "contiguous", id="2d"),
    pytest.param((), (5, 6), "transposed", id="2d-transposed-c"),
    pytest.param((), (5, 6), "col_strided", id="2d-strided-c"),
    pytest.param((2, 3), (2, 3, 5, 6), "contiguous", id="batched"),
    pytest.param((2, 3), (5, 6), "contiguous", id="c-broadcast-over-batch"),
    pytest.param((2, 3), (1, 3, 5, 6), "contiguous", id="c-broadcast-partly"),
    pytest.param((2, 3), (3, 5, 6), "offset", id="c-broadcast-offset"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha, beta", ALPHA_BETA)
@pytest.mark.parametrize("batch, c_shape, c_layout", C_CASES)
def test_c_alpha_beta(fw, rng, dtype, alpha, beta, batch, c_shape, c_layout):
    a, a64 = make(fw, rng, batch + (5, 4), dtype)
    b, b64 = make(fw, rng, (4, 6), dtype)
    c, c64 = make(fw, rng, c_shape, dtype, c_layout)
    before = fw.snapshot(c)
    result = gemmbridge.matmul(a, b, c=c, alpha=alpha, beta=beta)
    check(fw, result, reference(a64, b64, c=c64, alpha=alpha, beta=beta), dtype)
    assert fw.snapshot(c) == before, "c was modified"


@pytest.mark.parametrize("c_shape", [(1, 6), (6,), (5, 1)], ids=["row", "vector", "column"])
def test_c_expanded(fw, rng, c_shape):
    """c given as a stride-0 (broadcast) view of a row or column."""
    a, a64 = make(fw, rng, (5, 4), "float32")
    b, b64 = make(fw, rng, (4, 6), "float32")
    c1, c64 = make(fw, rng, c_shape, "float32")
    c = fw.broadcast_to(c1, (5, 6))
    result = gemmbridge.matmul(a, b, c=c, beta=-1.0)
    check(fw, result, reference(a64, b64, c=np.broadcast_to(c64, (5, 6)), beta=-1.0), "float32")


@pytest.mark.parametrize("sa, sb", [((6,), (6, 4)), ((4, 6), (6,)), ((6,), (6,))], ids=["1d@2d", "2d@1d", "1d@1d"])
def test_c_with_vector_operands(fw, rng, sa, sb):
    a, a64 = make(fw, rng, sa, "float64")
    b, b64 = make(fw, rng, sb, "float64")
    c, c64 = make(fw, rng, np.matmul(a64, b64).shape, "float64")
    result = gemmbridge.matmul(a, b, c=c, alpha=0.5, beta=-1.0)
    check(fw, result, reference(a64, b64, c=c64, alpha=0.5, beta=-1.0), "float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha, beta", ALPHA_BETA)
@pytest.mark.parametrize("c_layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["2d", "batched"])
def test_out_is_c(fw, rng, dtype, alpha, beta, c_layout, batch):
    """out=c accumulates in place: c ← alpha · a @ b + beta · c."""
    needs_out(fw)
    a, a64 = make(fw, rng, batch + (5, 4), dtype)
    b, b64 = make(fw, rng, batch + (4, 6), dtype)
    c, c64 = make(fw, rng, batch + (5, 6), dtype, c_layout)
    result = gemmbridge.matmul(a, b, c=c, alpha=alpha, beta=beta, out=c)
    check(fw, result, reference(a64, b64, c=c64, alpha=alpha, beta=beta), dtype, out=c)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_out_is_c_with_bias_and_epilogue(fw, rng, epilogue):
    needs_out(fw)
    a, a64 = make(fw, rng, (5, 4), "float32")
    b, b64 = make(fw, rng, (4, 6), "float32")
    c, c64 = make(fw, rng, (5, 6), "float32")
    bias, bias64 = make(fw, rng, (6,), "float32")
    result = gemmbridge.matmul(a, b, c=c, beta=0.5, bias=bias, epilogue=epilogue, out=c)
    check(fw, result, reference(a64, b64, c=c64, beta=0.5, bias=bias64, epilogue=epilogue), "float32", out=c)


def test_c_and_separate_out(fw, rng):
    needs_out(fw)
    a, a64 = make(fw, rng, (2, 5, 4), "float32")
    b, b64 = make(fw, rng, (4, 6), "float32")
    c, c64 = make(fw, rng, (5, 6), "float32")
    out = fw.poisoned((2, 5, 6), "float32")
    before = fw.snapshot(c)
    result = gemmbridge.matmul(a, b, c=c, alpha=2.0, beta=-0.5, out=out)
    check(fw, result, reference(a64, b64, c=c64, alpha=2.0, beta=-0.5), "float32", out=out)
    assert fw.snapshot(c) == before


# -- bias and epilogues ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("with_c", [False, True], ids=["", "c"])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["2d", "batched"])
def test_bias_and_epilogue(fw, rng, dtype, epilogue, with_bias, with_c, batch):
    m, k, n = 9, 6, 11
    a, a64 = make(fw, rng, batch + (m, k), dtype)
    b, b64 = make(fw, rng, (k, n), dtype)
    c, c64 = make(fw, rng, batch + (m, n), dtype) if with_c else (None, None)
    bias, bias64 = make(fw, rng, (n,), dtype) if with_bias else (None, None)
    result = gemmbridge.matmul(a, b, c=c, alpha=1.5, beta=0.5, bias=bias, epilogue=epilogue)
    ref = reference(a64, b64, c=c64, alpha=1.5, beta=0.5, bias=bias64, epilogue=epilogue)
    check(fw, result, ref, dtype, epilogue=epilogue)
    if epilogue == "relu":
        assert (fw.to_numpy64(result) >= 0).all()


@pytest.mark.parametrize("layout", ["col_strided", "offset", "negative"])
def test_bias_views(fw, rng, layout):
    a, a64 = make(fw, rng, (5, 4), "float32")
    b, b64 = make(fw, rng, (4, 6), "float32")
    bias, bias64 = make(fw, rng, (6,), "float32", layout)
    result = gemmbridge.matmul(a, b, bias=bias, epilogue="relu")
    check(fw, result, reference(a64, b64, bias=bias64, epilogue="relu"), "float32")


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("sa, sb", [((6,), (6, 4)), ((4, 6), (6,))], ids=["1d@2d", "2d@1d"])
def test_bias_with_vector_operands(fw, rng, epilogue, sa, sb):
    a, a64 = make(fw, rng, sa, "float64")
    b, b64 = make(fw, rng, sb, "float64")
    n = 1 if len(sb) == 1 else sb[-1]
    bias, bias64 = make(fw, rng, (n,), "float64")
    result = gemmbridge.matmul(a, b, bias=bias, epilogue=epilogue)
    check(fw, result, reference(a64, b64, bias=bias64, epilogue=epilogue), "float64", epilogue=epilogue)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogue_with_out(fw, rng, epilogue):
    needs_out(fw)
    a, a64 = make(fw, rng, (2, 7, 3), "bfloat16")
    b, b64 = make(fw, rng, (2, 3, 8), "bfloat16")
    bias, bias64 = make(fw, rng, (8,), "bfloat16")
    parent, out, inside = fw.out_view((2, 7, 8), "bfloat16", "offset")
    result = gemmbridge.matmul(a, b, bias=bias, epilogue=epilogue, out=out)
    check(fw, result, reference(a64, b64, bias=bias64, epilogue=epilogue), "bfloat16", out=out)
    assert np.isnan(fw.to_numpy64(parent)[~inside]).all()


# -- zero-size dims -------------------------------------------------------------------------------------

EMPTY = [
    pytest.param((0, 5), (5, 4), id="M=0"),
    pytest.param((3, 5), (5, 0), id="N=0"),
    pytest.param((0, 5), (5, 0), id="M=N=0"),
    pytest.param((0, 3, 5), (5, 4), id="batch=0"),
    pytest.param((2, 0, 3, 5), (1, 5, 4), id="batch=0-broadcast"),
    pytest.param((2, 0, 5), (5,), id="batch@1d-M=0"),
    pytest.param((5,), (5, 0), id="1d@2d-N=0"),
    pytest.param((0, 5), (5,), id="2d@1d-M=0"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sa, sb", EMPTY)
@pytest.mark.parametrize("with_out", [False, True], ids=["", "out"])
def test_empty_result(fw, rng, dtype, sa, sb, with_out):
    if with_out:
        needs_out(fw)
    a, a64 = make(fw, rng, sa, dtype)
    b, b64 = make(fw, rng, sb, dtype)
    ref = reference(a64, b64)
    out = fw.poisoned(ref.shape, dtype) if with_out else None
    result = gemmbridge.matmul(a, b, out=out)
    check(fw, result, ref, dtype, out=out)


def test_empty_result_with_c_bias_epilogue(fw, rng):
    a, a64 = make(fw, rng, (2, 0, 5), "float32")
    b, b64 = make(fw, rng, (5, 3), "float32")
    c, c64 = make(fw, rng, (2, 0, 3), "float32")
    bias, bias64 = make(fw, rng, (3,), "float32")
    result = gemmbridge.matmul(a, b, c=c, bias=bias, epilogue="gelu")
    check(fw, result, reference(a64, b64, c=c64, bias=bias64, epilogue="gelu"), "float32")


K_ZERO = [
    pytest.param((4, 0), (0, 6), False, False, id="2d"),
    pytest.param((0, 4), (6, 0), True, True, id="2d-transposed"),
    pytest.param((3, 4, 0), (0, 6), False, False, id="batched"),
    pytest.param((2, 1, 4, 0), (3, 6, 0), False, True, id="broadcast-bT"),
    pytest.param((0,), (0, 6), False, False, id="1d@2d"),
    pytest.param((4, 0), (0,), False, False, id="2d@1d"),
    pytest.param((0,), (0,), False, False, id="1d@1d"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sa, sb, transpose_a, transpose_b", K_ZERO)
@pytest.mark.parametrize("with_out", [False, True], ids=["", "out"])
def test_k_zero_gives_zeros(fw, rng, dtype, sa, sb, transpose_a, transpose_b, with_out):
    if with_out:
        needs_out(fw)
    a, a64 = make(fw, rng, sa, dtype)
    b, b64 = make(fw, rng, sb, dtype)
    ref = reference(a64, b64, transpose_a=transpose_a, transpose_b=transpose_b)
    assert ref.size == 0 or not ref.any()
    out = fw.poisoned(ref.shape, dtype) if with_out else None
    result = gemmbridge.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, out=out)
    check(fw, result, ref, dtype, out=out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("sa, sb, transpose_a, transpose_b", K_ZERO[:4])
@pytest.mark.parametrize("with_out", [False, True], ids=["", "out"])
def test_k_zero_with_c_bias_epilogue(fw, rng, dtype, epilogue, sa, sb, transpose_a, transpose_b, with_out):
    """K = 0: epilogue(beta · c + bias), alpha ignored."""
    if with_out:
        needs_out(fw)
    a, a64 = make(fw, rng, sa, dtype)
    b, b64 = make(fw, rng, sb, dtype)
    shape = reference(a64, b64, transpose_a=transpose_a, transpose_b=transpose_b).shape
    c, c64 = make(fw, rng, shape, dtype)
    bias, bias64 = make(fw, rng, shape[-1:], dtype)
    ref = reference(
        a64, b64, transpose_a=transpose_a, transpose_b=transpose_b, c=c64, alpha=3.0, beta=-0.5, bias=bias64,
        epilogue=epilogue,
    )  # fmt: skip
    out = fw.poisoned(shape, dtype) if with_out else None
    result = gemmbridge.matmul(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b, c=c, alpha=3.0, beta=-0.5, bias=bias,
        epilogue=epilogue, out=out,
    )  # fmt: skip
    check(fw, result, ref, dtype, out=out, epilogue=epilogue)


def test_k_zero_out_is_c(fw, rng):
    needs_out(fw)
    a, a64 = make(fw, rng, (2, 4, 0), "float64")
    b, b64 = make(fw, rng, (0, 6), "float64")
    c, c64 = make(fw, rng, (2, 4, 6), "float64")
    result = gemmbridge.matmul(a, b, c=c, beta=2.0, epilogue="relu", out=c)
    check(fw, result, reference(a64, b64, c=c64, beta=2.0, epilogue="relu"), "float64", out=c)


# -- the problem cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "sa, sb, k_zero", [((3, 5, 4), (4, 6), False), ((5,), (5, 6), False), ((3, 5, 0), (0, 6), True)],
    ids=["batched", "1d@2d", "K=0"],
)  # fmt: skip
@pytest.mark.parametrize("full", [False, True], ids=["plain", "c-bias-out"])
def test_cache_hit_gives_fresh_results(fw, rng, dtype, sa, sb, k_zero, full):
    """The second call with the same shapes reuses the cached problem and computes on the new data."""
    if full:
        needs_out(fw)
    sizes = []
    for _ in range(3):
        a, a64 = make(fw, rng, sa, dtype)
        b, b64 = make(fw, rng, sb, dtype)
        kwargs, ref_kwargs = {}, {}
        shape = np.matmul(a64, b64).shape
        if full:
            c, ref_kwargs["c"] = make(fw, rng, shape, dtype)
            bias, ref_kwargs["bias"] = make(fw, rng, shape[-1:], dtype)
            kwargs = {"c": c, "bias": bias, "epilogue": "gelu", "out": fw.poisoned(shape, dtype)}
            ref_kwargs["epilogue"] = "gelu"
        result = gemmbridge.matmul(a, b, alpha=0.75, beta=1.25, **kwargs)
        check(fw, result, reference(a64, b64, alpha=0.75, beta=1.25, **ref_kwargs), dtype, out=kwargs.get("out"))
        sizes.append(gemmbridge.cache_size())
    assert sizes[0] >= 1
    assert sizes[1] == sizes[2] == sizes[0], f"cache grew on repeated shapes: {sizes}"


def test_cache_distinguishes_options(fw, rng):
    """Same shapes, different flags: each is described separately and computed right."""
    a, a64 = make(fw, rng, (6, 6), "float32")
    b, b64 = make(fw, rng, (6, 6), "float32")
    for ta in (False, True):
        for tb in (False, True):
            for epilogue in EPILOGUES:
                result = gemmbridge.matmul(a, b, transpose_a=ta, transpose_b=tb, epilogue=epilogue)
                ref = reference(a64, b64, transpose_a=ta, transpose_b=tb, epilogue=epilogue)
                check(fw, result, ref, "float32")
    assert gemmbridge.cache_size() == 12
    gemmbridge.clear_cache()
    assert gemmbridge.cache_size() == 0


def test_cache_is_bounded_and_keeps_the_problems_in_use(monkeypatch):
    """Past its size the plan cache evicts; a plan hit since it was last passed over stays."""
    from gemmbridge import plan

    monkeypatch.setattr(plan.PLANS, "size", 8)
    gemmbridge.clear_cache()
    described = []
    real = plan.describe
    monkeypatch.setattr(
        plan, "describe", lambda *args, **kwargs: described.append(args[0].shape) or real(*args, **kwargs)
    )
    hot = np.ones((2, 3), np.float32), np.ones((3, 2), np.float32)
    gemmbridge.matmul(*hot)
    for n in range(1, 30):
        gemmbridge.matmul(np.ones((n, 4), np.float32), np.ones((4, 2), np.float32))
        gemmbridge.matmul(*hot)  # a hit every call: never evicted
        assert gemmbridge.cache_size() <= 8
    assert described.count((2, 3)) == 1 and gemmbridge.cache_size() == 8
    gemmbridge.matmul(np.ones((1, 4), np.float32), np.ones((4, 2), np.float32))  # long evicted: described again
    assert described.count((1, 4)) == 2
    gemmbridge.clear_cache()
