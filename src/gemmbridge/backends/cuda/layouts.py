"""A described problem in cuBLASLt's terms. Pure Python: no driver, no library, checked in CI.

cuBLASLt is column-major. A row-major result ``D[M, N] = op(a)[M, K] @ op(b)[K, N]`` is, read
column-major, ``Dᵀ[N, M] = op(b)ᵀ[N, K] @ op(a)ᵀ[K, M]``: cuBLASLt's A is our b, its B is our a,
its M is our N and its N our M. This module is the only place that swap is written.

Each operand matrix becomes a column-major layout: a row-major ``rows × cols`` matrix with leading
dimension ``ld`` is the column-major ``cols × rows`` matrix with that ld (no transpose); a
column-major one is the ``rows × cols`` column-major matrix read transposed. The epilogues follow
the swap too: cuBLASLt's bias runs along its M (our N); its ``BGRADA`` reduces its A (our b) and
``BGRADB`` its B (our a); its aux is column-major ``N × M`` (our row-major ``M × N``) with the
row length as leading dimension (in bits for the relu mask).
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import epilogues
from ...problem import Matrix, Problem


@dataclass(frozen=True, slots=True)
class LtLayout:
    """One cuBLASLt matrix layout: column-major ``rows × cols`` with ``ld``, used transposed or not."""

    rows: int
    cols: int
    ld: int
    transpose: bool
    batch_stride: int
    alignment: int


@dataclass(frozen=True, slots=True)
class LtProblem:
    """What cuBLASLt is told: layouts in its A, B, C, D roles, the epilogue, and byte offsets per call."""

    a: LtLayout  # our b
    b: LtLayout  # our a
    c: LtLayout
    d: LtLayout
    a_dtype: str  # of its A and B
    d_dtype: str  # of its C and D
    batch_count: int
    epilogue: str  # a cublasLtEpilogue_t member name
    aux_ld: int  # 0 when the epilogue has no aux
    offsets: tuple[tuple[int, int, int, int], ...]  # bytes added to its (A, B, C, D) pointers per call


def lt_layout(matrix: Matrix) -> LtLayout:
    """The column-major layout that reads ``matrix`` as stored (module doc)."""
    if matrix.row_major:
        return LtLayout(matrix.cols, matrix.rows, matrix.ld, False, matrix.batch_stride, matrix.alignment)
    return LtLayout(matrix.rows, matrix.cols, matrix.ld, True, matrix.batch_stride, matrix.alignment)


def lt_epilogue(epilogue: str, has_bias: bool) -> str:
    """The cublasLtEpilogue_t member name that computes ``epilogue`` in the swapped problem."""
    kind = epilogues.TABLE[epilogue]
    if kind.bias_grad == "a":
        return "BGRADB"  # our a is its B
    if kind.bias_grad == "b":
        return "BGRADA"
    if kind.aux_in != "none":
        return "D" + kind.aux_in.upper() + ("_BGRAD" if kind.bias_grad == "d" else "")
    name = {"none": "DEFAULT", "relu": "RELU", "gelu": "GELU"}[kind.activation]
    if kind.aux_out != "none":
        name += "_AUX"
    if has_bias:
        name = "BIAS" if name == "DEFAULT" else name + "_BIAS"
    return name


def transposed_copies(problem: Problem) -> tuple[str, ...]:
    """Operands to copy transposed first: cuBLASLt has no algorithm for ``BGRADB`` unless it reads its B
    transposed (our op(a) column-major), nor for ``BGRADA`` unless it reads its A as stored (our op(b)
    row-major) — measured on an H200, cuBLASLt 130100. The natural weight-gradient call (``a = dyᵀ``
    given as ``transpose_a=True``) needs no copy."""
    kind = epilogues.TABLE[problem.epilogue]
    if kind.bias_grad == "a" and problem.matrices.a.row_major:
        return ("a",)
    if kind.bias_grad == "b" and not problem.matrices.b.row_major:
        return ("b",)
    return ()


def lt_problem(problem: Problem) -> LtProblem:
    mats = problem.matrices
    a_size, d_size = problem.itemsize, problem.result_itemsize
    aux_ld = 0
    if problem.aux_shape is not None:
        aux_ld = problem.aux_shape[1] * (8 if epilogues.TABLE[problem.epilogue].aux == "relu" else 1)
    return LtProblem(
        a=lt_layout(mats.b),
        b=lt_layout(mats.a),
        c=lt_layout(mats.c),
        d=lt_layout(mats.d),
        a_dtype=problem.dtype,
        d_dtype=problem.result_dtype,
        batch_count=problem.batch_count,
        epilogue=lt_epilogue(problem.epilogue, problem.has_bias),
        aux_ld=aux_ld,
        offsets=tuple((o.b * a_size, o.a * a_size, o.c * d_size, o.d * d_size) for o in problem.outer_offsets),
    )
