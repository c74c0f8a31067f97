"""The pure problem description: layouts, transposes, batch collapsing, copies (no device code)."""

from __future__ import annotations

import numpy as np
import pytest

from gemmbridge.errors import AliasError, DeviceError, ShapeError
from gemmbridge.problem import TensorMeta, contiguous_strides, describe


def meta(shape, strides=None, dtype="float32", device="cuda:0"):
    return TensorMeta(tuple(shape), tuple(strides or contiguous_strides(tuple(shape))), dtype, device)


def test_row_major_operands_need_no_transpose():
    p = describe(meta((8, 16)), meta((16, 5)))
    # cuBLASLt computes Dᵀ = Bᵀ Aᵀ: its A is our b (5×16 col-major, ld 5), its B our a
    assert (p.lt_a.rows, p.lt_a.cols, p.lt_a.ld, p.lt_a.transpose) == (5, 16, 5, False)
    assert (p.lt_b.rows, p.lt_b.cols, p.lt_b.ld, p.lt_b.transpose) == (16, 8, 16, False)
    assert (p.lt_d.rows, p.lt_d.cols, p.lt_d.ld) == (5, 8, 5)
    assert p.copies == frozenset() and p.batch_count == 1 and len(p.outer_offsets) == 1


def test_transposed_views_become_transpose_flags_not_copies():
    a_t = meta((16, 8), (1, 16))  # a column-major (16, 8) matrix, e.g. the .T of a row-major (8, 16)
    p = describe(a_t, meta((5, 8)), transpose_b=True)
    assert p.copies == frozenset()
    assert p.lt_a.transpose is True and p.lt_b.transpose is True
    assert (p.m, p.n, p.k) == (16, 5, 8)


def test_two_non_unit_strides_are_copied_once():
    strided = meta((8, 16), (64, 2))
    p = describe(strided, meta((16, 5)))
    assert p.copies == frozenset({"a"})


def test_broadcast_batch_is_one_vendor_call_per_outer_index():
    p = describe(meta((4, 1, 8, 16)), meta((3, 16, 5)))
    assert p.out_shape == (4, 3, 8, 5)
    assert p.batch_count == 4 and len(p.outer_offsets) == 3  # the larger dim (4) is the vendor batch
    assert p.lt_b.batch_stride == 128 and p.lt_a.batch_stride == 0  # b is broadcast over it
    assert [o[1] for o in p.outer_offsets] == [0, 80, 160] and {o[0] for o in p.outer_offsets} == {0}


def test_the_largest_batch_dim_is_the_vendor_batch():
    p = describe(meta((1000, 1, 8, 8)), meta((1, 2, 8, 8)))
    assert p.batch_count == 1000 and len(p.outer_offsets) == 2


def test_contiguous_batches_collapse_into_one_call():
    p = describe(meta((2, 3, 8, 16)), meta((2, 3, 16, 5)))
    assert p.batch_count == 6 and len(p.outer_offsets) == 1


def test_one_dimensional_operands_are_promoted_and_squeezed():
    assert describe(meta((16,)), meta((16, 5))).out_shape == (5,)
    assert describe(meta((8, 16)), meta((16,))).out_shape == (8,)
    assert describe(meta((16,)), meta((16,))).out_shape == ()


def test_alignment_reflects_leading_dimension_and_batch_stride():
    p = describe(meta((8, 17), dtype="float16"), meta((17, 5), dtype="float16"))
    assert p.lt_b.alignment == 2  # ld 17 halves = 34 bytes
    assert describe(meta((8, 64), dtype="float16"), meta((64, 64), dtype="float16")).lt_b.alignment == 128


def test_out_written_directly_when_row_major_else_through_a_temporary():
    assert not describe(meta((8, 16)), meta((16, 5)), out=meta((8, 5), (8, 1))).out_via_temp
    assert describe(meta((8, 16)), meta((16, 5)), out=meta((8, 5), (1, 8))).out_via_temp


def test_internal_overlap_of_out_is_refused():
    with pytest.raises(AliasError, match="overlapping"):
        describe(meta((8, 16)), meta((16, 5)), out=meta((8, 5), (0, 1)))


def test_unsupported_device_kind_is_refused():
    with pytest.raises(DeviceError, match="mps:0"):
        describe(meta((2, 2), device="mps:0"), meta((2, 2), device="mps:0"))


def test_c_must_match_the_matrix_dims():
    with pytest.raises(ShapeError, match="c must have shape"):
        describe(meta((8, 16)), meta((16, 5)), c=meta((8, 6)))


def test_extent_and_overlap_helpers():
    assert meta((3, 4), (4, 1)).extent() == (0, 12)
    assert meta((3, 4), (-4, 1)).extent() == (-8, 4)
    assert meta((3, 4), (1, 3)).has_internal_overlap() is False
    assert meta((3, 4), (1, 1)).has_internal_overlap() is True


# -- the vendor layouts, executed by a NumPy stand-in for cuBLASLt ---------------------------------------


def _column_major(buffer: np.ndarray, offset: int, lay) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The rows×cols column-major matrix at ``offset`` of a flat buffer, op applied."""
    size = buffer.itemsize
    view = np.lib.stride_tricks.as_strided(buffer[offset:], (lay.rows, lay.cols), (size, lay.ld * size))
    return view.T if lay.transpose else view


def _run_like_cublaslt(problem, bufs: dict, alpha: float, beta: float) -> None:  # type: ignore[no-untyped-def]
    """D = alpha·op(A)·op(B) + beta·C per batch, exactly as the Problem describes it (A is our b)."""
    for oa, ob, oc, od in problem.outer_offsets:
        for i in range(problem.batch_count):
            lhs = _column_major(bufs["b"], ob + i * problem.lt_a.batch_stride, problem.lt_a)
            rhs = _column_major(bufs["a"], oa + i * problem.lt_b.batch_stride, problem.lt_b)
            c = _column_major(bufs["c"], oc + i * problem.lt_c.batch_stride, problem.lt_c).copy()
            d = _column_major(bufs["d"], od + i * problem.lt_d.batch_stride, problem.lt_d)
            d[...] = alpha * (lhs @ rhs) + beta * c


def _strided(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """A float64 view of ``shape``: contiguous, transposed storage, row-strided, or a broadcast batch."""
    if kind == "transposed" and len(shape) >= 2:
        return np.swapaxes(rng.standard_normal(shape[:-2] + (shape[-1], shape[-2])), -1, -2)
    if kind == "strided" and len(shape) >= 2:
        return rng.standard_normal(shape[:-2] + (shape[-2] * 2, shape[-1]))[..., ::2, :]
    if kind == "broadcast" and len(shape) >= 3:
        return np.broadcast_to(rng.standard_normal((1,) + shape[1:]), shape)
    return rng.standard_normal(shape)


def _flat(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The flat buffer under view ``x`` and the element offset where ``x`` starts."""
    base = x
    while base.base is not None:
        base = base.base
    start = (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // x.itemsize
    return base.reshape(-1), start


@pytest.mark.parametrize("seed", range(300))
def test_vendor_layouts_compute_the_product(seed: int):
    rng = np.random.default_rng(seed)
    m, n, k = (int(v) for v in rng.integers(1, 7, size=3))
    batch = tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(0, 3))))
    a_batch = tuple(d if rng.random() < 0.7 else 1 for d in batch)[int(rng.integers(0, len(batch) + 1)) :]
    b_batch = tuple(d if rng.random() < 0.7 else 1 for d in batch)[int(rng.integers(0, len(batch) + 1)) :]
    kinds = ("contiguous", "transposed", "strided", "broadcast")
    a = _strided(rng, a_batch + (m, k), kinds[int(rng.integers(0, 4))])
    b = _strided(rng, b_batch + (k, n), kinds[int(rng.integers(0, 4))])
    ref = np.matmul(a, b)
    out = _strided(rng, ref.shape, ("contiguous", "strided")[int(rng.integers(0, 2))])
    c = _strided(rng, ref.shape, ("contiguous", "strided", "broadcast")[int(rng.integers(0, 3))])

    def meta_of(x: np.ndarray) -> TensorMeta:
        return TensorMeta(x.shape, tuple(s // 8 for s in x.strides), "float64", "cuda:0")

    problem = describe(meta_of(a), meta_of(b), c=meta_of(c), out=meta_of(out))
    operands = {"a": a, "b": b, "c": c}
    for name in problem.copies:  # the library copies these to contiguous memory first
        operands[name] = np.ascontiguousarray(operands[name])
    d = np.ascontiguousarray(out) if problem.out_via_temp else out
    bufs, starts = {}, {}
    for name, x in (*operands.items(), ("d", d)):
        bufs[name], starts[name] = _flat(x)
    shifted = problem.outer_offsets
    object.__setattr__(problem, "outer_offsets", tuple(
        (oa + starts["a"], ob + starts["b"], oc + starts["c"], od + starts["d"]) for oa, ob, oc, od in shifted
    ))  # fmt: skip
    _run_like_cublaslt(problem, bufs, alpha=0.5, beta=2.0)
    np.testing.assert_allclose(d, 0.5 * ref + 2.0 * c, rtol=1e-12, atol=1e-12)
