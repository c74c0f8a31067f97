"""The pure problem description: layouts, transposes, batch collapsing, copies (no device code)."""

from __future__ import annotations

import pytest

from gemmbridge.errors import AliasError, DeviceError, ShapeError
from gemmbridge.problem import TensorMeta, contiguous_strides, describe, has_internal_overlap


def meta(shape, strides=None, dtype="float32", device="cuda:0"):
    return TensorMeta(tuple(shape), tuple(strides or contiguous_strides(tuple(shape))), dtype, device)


def test_row_major_operands_need_no_transpose():
    p = describe(meta((8, 16)), meta((16, 5)))
    a, b, c, d = p.matrices[:4]
    assert (a.rows, a.cols, a.row_major, a.ld) == (8, 16, True, 16)
    assert (b.rows, b.cols, b.row_major, b.ld) == (16, 5, True, 5)
    assert (d.rows, d.cols, d.row_major, d.ld) == (8, 5, True, 5) and c == d  # no c: cuBLASLt's C is D
    assert p.copies == frozenset() and p.batch_count == 1 and len(p.outer_offsets) == 1


def test_transposed_views_are_column_major_matrices_not_copies():
    a_t = meta((16, 8), (1, 16))  # a column-major (16, 8) matrix, e.g. the .T of a row-major (8, 16)
    p = describe(a_t, meta((5, 8)), transpose_b=True)
    assert p.copies == frozenset()
    assert p.matrices.a.row_major is False and p.matrices.a.ld == 16  # unit row stride: column-major
    assert p.matrices.b.row_major is False and p.matrices.b.ld == 8  # op(b) of a row-major (5, 8) b
    assert (p.m, p.n, p.k) == (16, 5, 8)


def test_two_non_unit_strides_are_copied_once():
    strided = meta((8, 16), (64, 2))
    p = describe(strided, meta((16, 5)))
    assert p.copies == frozenset({"a"})


def test_broadcast_batch_is_one_vendor_call_per_outer_index():
    p = describe(meta((4, 1, 8, 16)), meta((3, 16, 5)))
    assert p.out_shape == (4, 3, 8, 5)
    assert p.batch_count == 4 and len(p.outer_offsets) == 3  # the larger dim (4) is the vendor batch
    assert p.matrices.a.batch_stride == 128 and p.matrices.b.batch_stride == 0  # b is broadcast over it
    assert [o.b for o in p.outer_offsets] == [0, 80, 160] and {o.a for o in p.outer_offsets} == {0}


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
    assert p.matrices.a.alignment == 2  # ld 17 halves = 34 bytes
    assert describe(meta((8, 64), dtype="float16"), meta((64, 64), dtype="float16")).matrices.a.alignment == 128


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
    assert has_internal_overlap(meta((3, 4), (1, 3))) is False
    assert has_internal_overlap(meta((3, 4), (1, 1))) is True
    assert has_internal_overlap(meta((3, 2), (2, 3))) is False  # six distinct elements: 0 3 2 5 4 7
    assert has_internal_overlap(meta((3, 3), (1, 2))) is True  # (2, 0) and (0, 1) both reach element 2


def test_a_batch_does_not_fold_into_more_rows_than_32_bits_hold():
    p = describe(meta((65536, 65536, 2), dtype="float16"), meta((2, 4), dtype="float16"))
    assert p.m == 65536 and p.batch_count == 65536  # 2³² rows folded would overflow the vendor's M


def test_a_contiguous_batch_over_a_plain_b_folds_into_rows():
    p = describe(meta((2, 3, 8, 16)), meta((16, 5)))
    assert (p.m, p.batch_count, len(p.outer_offsets)) == (48, 1, 1) and p.out_shape == (2, 3, 8, 5)
    one = describe(meta((1, 8, 16)), meta((16, 5)), epilogue="gelu_aux")  # a batch of one is rows too
    assert (one.m, one.batch_count) == (8, 1) and one.out_shape == (1, 8, 5)
    row_major_op_a = describe(meta((2, 16, 8), (128, 1, 16)), meta((16, 5)), transpose_a=True)
    assert (row_major_op_a.m, row_major_op_a.batch_count) == (16, 1)
    column_major_op_a = describe(meta((2, 16, 8)), meta((16, 5)), transpose_a=True)  # rows of op(a) not stacked
    assert (column_major_op_a.m, column_major_op_a.batch_count) == (8, 2)
