"""The pure problem description: layouts, transposes, batch collapsing, copies (no device code)."""

from __future__ import annotations

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
    assert p.batch_count == 3 and len(p.outer_offsets) == 4
    assert p.lt_b.batch_stride == 0  # a is broadcast over the inner batch
    assert [o[0] for o in p.outer_offsets] == [0, 128, 256, 384]


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
