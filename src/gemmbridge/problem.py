"""Pure description of one GEMM call: validation, broadcasting and layouts.

No device code lives here. ``describe`` turns the metadata of the operands
(shape, strides in elements, dtype, device) and the options into a frozen
``Problem`` that every backend executes, or raises the specific error.

The vendor layout is cuBLAS's column-major one. A row-major result
``D[M, N] = A[M, K] @ B[K, N]`` is computed as the column-major product
``Dᵀ[N, M] = Bᵀ[N, K] @ Aᵀ[K, M]``, so ``lt_a`` below describes B and ``lt_b``
describes A. Each operand's layout is read from its strides: a row-major
matrix is used as stored, a column-major one with the transpose flag, and
anything else (two non-unit strides, negative or zero strides) is flagged for
one contiguous copy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .errors import AliasError, DeviceError, DTypeError, OptionError, ShapeError

ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
EPILOGUES = ("none", "relu", "gelu")
MAX_ALIGNMENT = 256
MAX_DIM = 2**31 - 1  # cuBLASLt and LP64 BLAS index dimensions with 32-bit integers


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What gemmbridge needs to know of an operand, pointer aside."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    dtype: str
    device: str  # "cpu" or "cuda:<index>"

    def __str__(self) -> str:
        return f"{self.shape} {self.dtype} on {self.device}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extent(self) -> tuple[int, int]:
        """Lowest and one-past-highest element offset this view touches."""
        if self.numel == 0:
            return 0, 0
        lo = sum(s * (n - 1) for n, s in zip(self.shape, self.strides) if s < 0)
        hi = sum(s * (n - 1) for n, s in zip(self.shape, self.strides) if s > 0)
        return lo, hi + 1

    def has_internal_overlap(self) -> bool:
        """True when two indices of the view reach the same element."""
        if self.numel == 0:
            return False
        reach = 1
        dims = sorted((abs(s), n) for n, s in zip(self.shape, self.strides) if n > 1)
        for stride, n in dims:
            if stride < reach:
                return True
            reach = stride * (n - 1) + reach
        return False


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True, slots=True)
class Layout:
    """One column-major cuBLASLt matrix: rows × cols, leading dim, op, batch stride."""

    rows: int
    cols: int
    ld: int
    transpose: bool
    batch_stride: int
    alignment: int  # bytes the layout itself guarantees (pointer aside)


@dataclass(frozen=True, slots=True)
class Problem:
    """A validated GEMM: ``D = epilogue(alpha · op(a) @ op(b) + beta · c + bias)``."""

    dtype: str
    device: str
    m: int
    n: int
    k: int
    batch_shape: tuple[int, ...]
    out_shape: tuple[int, ...]  # the shape returned to the caller (1-D operands squeezed)
    transpose_a: bool
    transpose_b: bool
    has_bias: bool
    epilogue: str
    copies: frozenset[str]  # operands copied to contiguous memory first ("a", "b", "c", "bias")
    out_via_temp: bool  # out's layout cannot be written directly: compute, then copy in
    lt_a: Layout  # B side (see module doc)
    lt_b: Layout  # A side
    lt_c: Layout
    lt_d: Layout
    batch_count: int  # batches inside one vendor call
    outer_offsets: tuple[tuple[int, int, int, int], ...]  # element offsets (a, b, c, d) per call
    extents: dict[str, tuple[int, int]]  # element extents of a, b, c, bias, out for aliasing checks

    @property
    def empty(self) -> bool:
        """True when the result has no elements (no vendor call is made)."""
        return self.m == 0 or self.n == 0 or math.prod(self.batch_shape) == 0

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


def names(a: TensorMeta, b: TensorMeta) -> str:
    """The start of every error message: both operands with shape, dtype and device."""
    return f"matmul: a is {a}, b is {b}"


def _matrix_order(rows: int, cols: int, rs: int, cs: int) -> tuple[bool, int] | None:
    """(row_major, ld) describing a rows×cols matrix with strides (rs, cs), or None."""
    if (cs == 1 or cols <= 1) and (rows <= 1 or rs >= max(cols, 1)):
        return True, (rs if rows > 1 else max(cols, 1))
    if (rs == 1 or rows <= 1) and (cols <= 1 or cs >= max(rows, 1)):
        return False, (cs if cols > 1 else max(rows, 1))
    return None


def _check_dtypes(a: TensorMeta, b: TensorMeta, extra: dict[str, TensorMeta]) -> str:
    if a.dtype not in ITEMSIZE or b.dtype not in ITEMSIZE:
        bad = a.dtype if a.dtype not in ITEMSIZE else b.dtype
        raise DTypeError(f"{names(a, b)} — dtype {bad} is not supported (supported: {', '.join(ITEMSIZE)})")
    if a.dtype != b.dtype:
        raise DTypeError(f"{names(a, b)} — dtypes {a.dtype} and {b.dtype} differ (no implicit casts)")
    for name, meta in extra.items():
        if meta.dtype != a.dtype:
            raise DTypeError(f"{names(a, b)}, {name} is {meta} — {name} must have dtype {a.dtype}")
    return a.dtype


def _check_devices(a: TensorMeta, b: TensorMeta, extra: dict[str, TensorMeta]) -> str:
    for name, meta in (("b", b), *extra.items()):
        if meta.device == a.device:
            continue
        where = "" if name == "b" else f", {name} is {meta}"
        if "cpu" in (meta.device, a.device):
            raise DeviceError(f"{names(a, b)}{where} — CPU and GPU operands are mixed")
        raise DeviceError(f"{names(a, b)}{where} — devices {a.device} and {meta.device} differ")
    return a.device


def _logical(meta: TensorMeta, transpose: bool, name: str, promote_row: bool, operands: str = "") -> TensorMeta:
    """The operand as a batch of matrices: 1-D promoted, transpose applied."""
    shape, strides = meta.shape, meta.strides
    if len(shape) == 1:
        if transpose:
            raise OptionError(f"{operands or 'matmul'} — transpose_{name} needs a matrix, {name} is 1-D")
        if promote_row:
            return TensorMeta((1, shape[0]), (shape[0], strides[0]), meta.dtype, meta.device)
        return TensorMeta((shape[0], 1), (strides[0], 1), meta.dtype, meta.device)
    if transpose:
        shape = shape[:-2] + (shape[-1], shape[-2])
        strides = strides[:-2] + (strides[-1], strides[-2])
    return TensorMeta(shape, strides, meta.dtype, meta.device)


def _broadcast(a: TensorMeta, b: TensorMeta, x: tuple[int, ...], y: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for i in range(max(len(x), len(y))):
        p = x[len(x) - 1 - i] if i < len(x) else 1
        q = y[len(y) - 1 - i] if i < len(y) else 1
        if p != q and 1 not in (p, q):
            raise ShapeError(f"{names(a, b)} — batch shapes {x} and {y} cannot be broadcast")
        out.append(q if p == 1 else p)
    return tuple(reversed(out))


def _batch_strides(meta: TensorMeta, batch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The operand's strides over the full batch shape (0 where it is broadcast)."""
    own = meta.shape[:-2]
    pad = len(batch_shape) - len(own)
    out = [0] * pad
    for n, s in zip(own, meta.strides[:-2]):
        out.append(s if n != 1 else 0)
    return tuple(out)


def _collapse(
    batch_shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[int, tuple[int, ...], list[tuple[int, tuple[int, ...]]]]:
    """Merge batch dims that every operand walks linearly.

    Returns the inner batch (count, stride per operand), done by one vendor call,
    and the outer dims (size, strides) looped over. The largest merged dim is the
    inner one, so ``(1000, 1, M, K) @ (1, 2, K, N)`` makes 2 calls of batch 1000.
    """
    dims = [(n, tuple(s[i] for s in strides)) for i, n in enumerate(batch_shape) if n != 1]
    merged: list[tuple[int, tuple[int, ...]]] = []
    for n, st in dims:
        if merged:
            pn, pst = merged[-1]
            if all(p == q * n for p, q in zip(pst, st)):
                merged[-1] = (pn * n, st)
                continue
        merged.append((n, st))
    if not merged:
        return 1, tuple(0 for _ in strides), []
    inner = max(range(len(merged)), key=lambda i: merged[i][0])
    inner_n, inner_st = merged[inner]
    return inner_n, inner_st, merged[:inner] + merged[inner + 1 :]


def _outer_offsets(outer: list[tuple[int, tuple[int, ...]]], n_ops: int) -> tuple[tuple[int, ...], ...]:
    if not outer:
        return ((0,) * n_ops,)
    offsets = []
    for idx in itertools.product(*(range(n) for n, _ in outer)):
        offsets.append(tuple(sum(i * st[j] for i, (_, st) in zip(idx, outer)) for j in range(n_ops)))
    return tuple(offsets)


def _alignment(itemsize: int, *strides: int) -> int:
    g = MAX_ALIGNMENT
    for s in strides:
        g = math.gcd(g, abs(s) * itemsize)
    return g


def _as_result(meta: TensorMeta, a_vec: bool, b_vec: bool, n: int) -> TensorMeta:
    """Re-insert the size-1 dims that 1-D operands squeeze out of the result."""
    shape, strides = list(meta.shape), list(meta.strides)
    if b_vec:
        shape.append(1)
        strides.append(1)
    if a_vec:
        shape.insert(len(shape) - 1, 1)
        strides.insert(len(strides) - 1, max(n, 1))
    return TensorMeta(tuple(shape), tuple(strides), meta.dtype, meta.device)


def _contiguous_copy(
    name: str, a: TensorMeta, b: TensorMeta, c: TensorMeta | None, ta: bool, tb: bool, n: int
) -> TensorMeta:
    """The logical view of operand ``name`` after it is copied to contiguous memory."""
    if name == "a":
        return _logical(_contiguous(a), ta, "a", promote_row=True)
    if name == "b":
        return _logical(_contiguous(b), tb, "b", promote_row=False)
    assert c is not None
    return _as_result(_contiguous(c), len(a.shape) == 1, len(b.shape) == 1, n)


def _contiguous(meta: TensorMeta) -> TensorMeta:
    return TensorMeta(meta.shape, contiguous_strides(meta.shape), meta.dtype, meta.device)


def describe(
    a: TensorMeta,
    b: TensorMeta,
    *,
    c: TensorMeta | None = None,
    bias: TensorMeta | None = None,
    out: TensorMeta | None = None,
    transpose_a: bool = False,
    transpose_b: bool = False,
    epilogue: str = "none",
) -> Problem:
    """Validate one call and describe it; raise the specific error otherwise."""
    extra = {n: m for n, m in (("c", c), ("bias", bias), ("out", out)) if m is not None}
    if epilogue not in EPILOGUES:
        raise OptionError(f"{names(a, b)} — unknown epilogue {epilogue!r} (choose one of {', '.join(EPILOGUES)})")
    for name, meta in (("a", a), ("b", b)):
        if len(meta.shape) == 0:
            raise ShapeError(f"{names(a, b)} — {name} is 0-d; matmul needs at least 1 dimension")
    dtype = _check_dtypes(a, b, extra)
    device = _check_devices(a, b, extra)
    if device != "cpu" and not device.startswith("cuda:"):
        raise DeviceError(f"{names(a, b)} — device {device} is not supported (cpu, cuda)")

    la = _logical(a, transpose_a, "a", promote_row=True, operands=names(a, b))
    lb = _logical(b, transpose_b, "b", promote_row=False, operands=names(a, b))
    m, k = la.shape[-2:]
    kb, n = lb.shape[-2:]
    if k != kb:
        raise ShapeError(f"{names(a, b)} — inner dimensions {k} and {kb} differ")
    batch_shape = _broadcast(a, b, la.shape[:-2], lb.shape[:-2])
    for what, size in (("M", m), ("N", n), ("K", k), ("batch count", math.prod(batch_shape))):
        if size > MAX_DIM:
            raise ShapeError(f"{names(a, b)} — {what} = {size} exceeds the vendor libraries' 32-bit limit {MAX_DIM}")
    a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
    out_shape = batch_shape + (() if a_vec else (m,)) + (() if b_vec else (n,))
    lc = None if c is None else _as_result(_check_c(a, b, c, batch_shape, out_shape), a_vec, b_vec, n)
    if bias is not None and bias.shape != (n,):
        raise ShapeError(f"{names(a, b)}, bias is {bias} — bias must have shape ({n},)")
    ld_out = None
    if out is not None:
        if out.shape != out_shape:
            raise ShapeError(f"{names(a, b)}, out is {out} — out must have shape {out_shape}")
        if out.has_internal_overlap():
            raise AliasError(f"{names(a, b)}, out is {out} — out has overlapping elements (a broadcast view)")
        ld_out = _as_result(out, a_vec, b_vec, n)

    operands = {"a": la, "b": lb} if lc is None else {"a": la, "b": lb, "c": lc}
    copies = {name for name, meta in operands.items() if not _describable(meta, row_major_only=name == "c")}
    for name in copies:
        operands[name] = _contiguous_copy(name, a, b, c, transpose_a, transpose_b, n)
    if bias is not None and n > 1 and bias.strides[0] != 1:
        copies.add("bias")
    out_via_temp = ld_out is not None and not _describable(ld_out, row_major_only=True)
    d = (
        ld_out
        if ld_out is not None and not out_via_temp
        else _contiguous(TensorMeta(batch_shape + (m, n), (), dtype, device))
    )
    layouts, batch_count, offsets = _vendor_layouts(operands, d, batch_shape, m, n, k, ITEMSIZE[dtype])

    extents = {"a": a.extent(), "b": b.extent()}
    extents.update({name: meta.extent() for name, meta in extra.items()})
    return Problem(
        dtype=dtype,
        device=device,
        m=m,
        n=n,
        k=k,
        batch_shape=batch_shape,
        out_shape=out_shape,
        transpose_a=transpose_a,
        transpose_b=transpose_b,
        has_bias=bias is not None,
        epilogue=epilogue,
        copies=frozenset(copies),
        out_via_temp=out_via_temp,
        lt_a=layouts["b"],
        lt_b=layouts["a"],
        lt_c=layouts["c"],
        lt_d=layouts["d"],
        batch_count=batch_count,
        outer_offsets=offsets,  # type: ignore[arg-type]
        extents=extents,
    )


def _check_c(
    a: TensorMeta, b: TensorMeta, c: TensorMeta, batch_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> TensorMeta:
    """``c`` has the result's matrix dims and batch dims that broadcast to the result's."""
    matrix_rank = len(out_shape) - len(batch_shape)
    lead = c.shape[: len(c.shape) - matrix_rank]
    if len(c.shape) < matrix_rank or c.shape[len(lead) :] != out_shape[len(batch_shape) :]:
        raise ShapeError(f"{names(a, b)}, c is {c} — c must have shape {out_shape} (batch dims may broadcast)")
    try:
        broadcast_ok = _broadcast(a, b, lead, batch_shape) == batch_shape
    except ShapeError:
        broadcast_ok = False
    if not broadcast_ok:
        raise ShapeError(f"{names(a, b)}, c is {c} — c's batch shape {lead} does not broadcast to {batch_shape}")
    return c


def _describable(meta: TensorMeta, row_major_only: bool) -> bool:
    """True when the vendor library can read this batch of matrices as it is stored."""
    order = _matrix_order(meta.shape[-2], meta.shape[-1], meta.strides[-2], meta.strides[-1])
    return order is not None and all(s >= 0 for s in meta.strides) and (order[0] or not row_major_only)


def _vendor_layouts(
    operands: dict[str, TensorMeta], d: TensorMeta, batch_shape: tuple[int, ...], m: int, n: int, k: int, itemsize: int
) -> tuple[dict[str, Layout], int, tuple[tuple[int, ...], ...]]:
    """cuBLASLt layouts of a, b, c, d (column-major, Dᵀ = Bᵀ Aᵀ), the inner batch count, the outer offsets."""
    metas = [operands["a"], operands["b"], operands.get("c", d), d]
    batch_count, inner, outer = _collapse(batch_shape, [_batch_strides(meta, batch_shape) for meta in metas])
    layouts = {}
    for j, (name, rows, cols) in enumerate((("a", m, k), ("b", k, n), ("c", m, n), ("d", m, n))):
        meta = metas[j]
        order = _matrix_order(rows, cols, meta.strides[-2], meta.strides[-1])
        assert order is not None
        row_major, ld = order
        align = _alignment(itemsize, ld, inner[j], *(st[j] for _, st in outer))
        shape = (cols, rows) if row_major else (rows, cols)
        layouts[name] = Layout(shape[0], shape[1], ld, not row_major, inner[j], align)
    return layouts, batch_count, _outer_offsets(outer, len(metas))
