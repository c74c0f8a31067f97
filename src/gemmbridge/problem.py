"""Pure description of one GEMM call: validation, broadcasting and memory layouts.

No device code lives here. ``describe`` turns the metadata of the operands
(shape, strides in elements, dtype, device) and the options into a frozen
``Problem`` that every backend executes, or raises the specific error.

Every operand is described in the caller's row-major terms: ``op(a)`` is an
``M × K`` matrix, ``op(b)`` ``K × N``, ``c`` and the result ``d`` ``M × N``. A
``Matrix`` says how one of them lies in memory: row-major (unit column
stride) or column-major (unit row stride), with its leading dimension and
batch stride. Anything else (two non-unit strides, negative strides) is
flagged for one contiguous copy. How a vendor library wants the layouts (the
column-major swap of cuBLASLt) is the backend's business.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import epilogues
from .errors import AliasError, DeviceError, DTypeError, OptionError, ShapeError

ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "uint8": 1}
INPUT_DTYPES = ("float16", "bfloat16", "float32", "float64")
HALF = ("float16", "bfloat16")
MAX_ALIGNMENT = 256
MAX_DIM = 2**31 - 1  # cuBLASLt and LP64 BLAS index dimensions with 32-bit integers


class Operands(NamedTuple):
    """One slot per operand of a call, in one fixed order; ``d`` is the result (``out`` when given).

    Used for metadata, pointers, byte extents and layouts alike; an absent operand is None (0 for a pointer).
    """

    a: Any = None
    b: Any = None
    c: Any = None
    d: Any = None
    bias: Any = None
    aux: Any = None
    bias_grad: Any = None


NAMES = Operands._fields
READ_ONLY = ("a", "b", "c", "bias")  # operands never written (aux is read or written, by epilogue)


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

    def byte_extent(self) -> tuple[int, int]:
        lo, hi = self.extent()
        size = ITEMSIZE.get(self.dtype, 1)
        return lo * size, hi * size


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True, slots=True)
class Matrix:
    """One operand as a batch of ``rows × cols`` matrices in memory (row-major terms of the caller)."""

    rows: int
    cols: int
    row_major: bool  # unit column stride; else unit row stride (column-major)
    ld: int  # the stride, in elements, of the non-unit dimension
    batch_stride: int  # elements between matrices of the one-call batch (0: broadcast)
    alignment: int  # bytes the layout itself guarantees (pointer aside)


@dataclass(frozen=True, slots=True)
class Problem:
    """A validated GEMM: ``D = epilogue(alpha · op(a) @ op(b) + beta · c + bias)`` (``epilogues.py``)."""

    dtype: str  # of a and b
    result_dtype: str  # of d, c, bias, bias_grad and a gelu aux: dtype, or float32 from half inputs
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
    matrices: Operands  # Matrix of a (op(a), M×K), b (op(b), K×N), c and d (M×N); None elsewhere
    batch_count: int  # batches inside one vendor call
    outer_offsets: tuple[Operands, ...]  # element offsets of a, b, c, d per vendor call
    byte_extents: Operands  # (lo, hi) bytes each given operand spans, for the aliasing check; d is out's
    aux_shape: tuple[int, int] | None  # shape of aux (epilogues.aux_shape), when the epilogue has one
    bias_grad_length: int  # 0 when the epilogue makes no bias gradient

    @property
    def empty(self) -> bool:
        """True when the result has no elements (no vendor call is made)."""
        return self.m == 0 or self.n == 0 or math.prod(self.batch_shape) == 0

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def result_itemsize(self) -> int:
        return ITEMSIZE[self.result_dtype]

    @property
    def aux_dtype(self) -> str:
        return epilogues.aux_dtype(self.epilogue, self.result_dtype)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k * self.batch_count * len(self.outer_offsets)


def names(a: TensorMeta, b: TensorMeta) -> str:
    """The start of every error message: both operands with shape, dtype and device."""
    return f"matmul: a is {a}, b is {b}"


def has_internal_overlap(meta: TensorMeta) -> bool:
    """True when two indices of the view reach the same element (exact for views up to 2²⁰ elements)."""
    dims = sorted((abs(s), n) for n, s in zip(meta.shape, meta.strides) if n > 1)
    if meta.numel == 0 or not dims:
        return False
    reach = 1
    for stride, n in dims:
        if stride < reach:
            break
        reach = stride * (n - 1) + reach
    else:
        return False  # each stride steps over everything the smaller ones reach: one element per index
    if meta.numel > 1 << 20:
        return True  # too large to enumerate: refuse rather than risk writing one element twice
    import numpy as np

    offsets = np.zeros(1, dtype=np.int64)
    for stride, n in dims:
        offsets = (offsets[:, None] + stride * np.arange(n, dtype=np.int64)).reshape(-1)
    return bool(np.unique(offsets).size < offsets.size)


def _matrix_order(rows: int, cols: int, rs: int, cs: int) -> tuple[bool, int] | None:
    """(row_major, ld) describing a rows×cols matrix with strides (rs, cs), or None."""
    if (cs == 1 or cols <= 1) and (rows <= 1 or rs >= max(cols, 1)):
        return True, (rs if rows > 1 else max(cols, 1))
    if (rs == 1 or rows <= 1) and (cols <= 1 or cs >= max(rows, 1)):
        return False, (cs if cols > 1 else max(rows, 1))
    return None


def dtype_name(dtype: Any) -> str:
    """A dtype given as a name or a framework dtype object (torch, numpy, jax, cupy) as its name."""
    if isinstance(dtype, str) and dtype in ITEMSIZE:
        return dtype
    name = str(dtype)
    if name.startswith("torch."):
        return name.removeprefix("torch.")
    try:
        import numpy as np

        return np.dtype(dtype).name
    except TypeError:
        return name


def _check_dtypes(
    a: TensorMeta, b: TensorMeta, extra: dict[str, TensorMeta], out_dtype: Any, epilogue: str
) -> tuple[str, str]:
    """(input dtype, result dtype); every mix other than float32 results from half inputs is refused."""
    for meta in (a, b):
        if meta.dtype not in INPUT_DTYPES:
            raise DTypeError(
                f"{names(a, b)} — dtype {meta.dtype} is not supported (supported: {', '.join(INPUT_DTYPES)})"
            )
    if a.dtype != b.dtype:
        raise DTypeError(f"{names(a, b)} — dtypes {a.dtype} and {b.dtype} differ (no implicit casts)")
    result = a.dtype if out_dtype is None else dtype_name(out_dtype)
    if result != a.dtype and not (a.dtype in HALF and result == "float32"):
        raise DTypeError(
            f"{names(a, b)} — out_dtype {result} is not supported for {a.dtype} inputs "
            f"(the result is {a.dtype}{', or float32' if a.dtype in HALF else ''})"
        )
    for name, meta in extra.items():
        want = epilogues.aux_dtype(epilogue, result) if name == "aux" else result
        if meta.dtype != want:
            hint = ""
            if name in ("out", "c") and a.dtype in HALF and meta.dtype == "float32" and out_dtype is None:
                hint = " (pass out_dtype='float32' for a float32 result from half inputs)"
            raise DTypeError(f"{names(a, b)}, {name} is {meta} — {name} must have dtype {want}{hint}")
    return a.dtype, result


def _check_devices(a: TensorMeta, b: TensorMeta, extra: dict[str, TensorMeta]) -> str:
    for name, meta in (("b", b), *extra.items()):
        if meta.device == a.device:
            continue
        where = "" if name == "b" else f", {name} is {meta}"
        if "cpu" in (meta.device, a.device):
            raise DeviceError(f"{names(a, b)}{where} — CPU and GPU operands are mixed")
        raise DeviceError(f"{names(a, b)}{where} — devices {a.device} and {meta.device} differ")
    if a.device != "cpu" and not a.device.startswith("cuda:"):
        raise DeviceError(f"{names(a, b)} — device {a.device} is not supported (cpu, cuda)")
    return a.device


def _logical(meta: TensorMeta, transpose: bool, name: str, promote_row: bool, operands: str) -> TensorMeta:
    """The operand as a batch of matrices: 1-D promoted, transpose applied."""
    shape, strides = meta.shape, meta.strides
    if len(shape) == 1:
        if transpose:
            raise OptionError(f"{operands} — transpose_{name} needs a matrix, {name} is 1-D")
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
    out = [0] * (len(batch_shape) - len(own))
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


def _outer_offsets(outer: list[tuple[int, tuple[int, ...]]]) -> tuple[Operands, ...]:
    """Element offsets of (a, b, c, d) for each outer batch index."""
    offsets = []
    for idx in itertools.product(*(range(n) for n, _ in outer)):
        offsets.append(Operands(*(sum(i * st[j] for i, (_, st) in zip(idx, outer)) for j in range(4))))
    return tuple(offsets) or (Operands(0, 0, 0, 0),)


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


def _contiguous(meta: TensorMeta) -> TensorMeta:
    return TensorMeta(meta.shape, contiguous_strides(meta.shape), meta.dtype, meta.device)


def _describable(meta: TensorMeta, row_major_only: bool) -> bool:
    """True when a vendor library can read this batch of matrices as it is stored."""
    order = _matrix_order(meta.shape[-2], meta.shape[-1], meta.strides[-2], meta.strides[-1])
    return order is not None and all(s >= 0 for s in meta.strides) and (order[0] or not row_major_only)


def describe(
    a: TensorMeta,
    b: TensorMeta,
    *,
    c: TensorMeta | None = None,
    bias: TensorMeta | None = None,
    out: TensorMeta | None = None,
    aux: TensorMeta | None = None,
    bias_grad: TensorMeta | None = None,
    transpose_a: bool = False,
    transpose_b: bool = False,
    epilogue: str = "none",
    out_dtype: Any = None,
) -> Problem:
    """Validate one call and describe it; raise the specific error otherwise."""
    extra = {
        n: m
        for n, m in (("c", c), ("bias", bias), ("out", out), ("aux", aux), ("bias_grad", bias_grad))
        if m is not None
    }
    if not isinstance(epilogue, str) or epilogue not in epilogues.TABLE:
        raise OptionError(f"{names(a, b)} — unknown epilogue {epilogue!r} (choose one of {', '.join(epilogues.NAMES)})")
    kind = epilogues.TABLE[epilogue]
    for name, meta in (("a", a), ("b", b)):
        if len(meta.shape) == 0:
            raise ShapeError(f"{names(a, b)} — {name} is 0-d; matmul needs at least 1 dimension")
    dtype, result_dtype = _check_dtypes(a, b, extra, out_dtype, epilogue)
    device = _check_devices(a, b, extra)

    operands = names(a, b)
    la = _logical(a, transpose_a, "a", promote_row=True, operands=operands)
    lb = _logical(b, transpose_b, "b", promote_row=False, operands=operands)
    m, k = la.shape[-2:]
    kb, n = lb.shape[-2:]
    if k != kb:
        raise ShapeError(f"{operands} — inner dimensions {k} and {kb} differ")
    batch_shape = _broadcast(a, b, la.shape[:-2], lb.shape[:-2])
    for what, size in (("M", m), ("N", n), ("K", k), ("batch count", math.prod(batch_shape))):
        if size > MAX_DIM:
            raise ShapeError(f"{operands} — {what} = {size} exceeds the vendor libraries' 32-bit limit {MAX_DIM}")
    a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
    out_shape = batch_shape + (() if a_vec else (m,)) + (() if b_vec else (n,))
    lc = None if c is None else _as_result(_check_c(a, b, c, batch_shape, out_shape), a_vec, b_vec, n)
    if bias is not None:
        if not kind.takes_bias:
            raise OptionError(f"{operands}, bias is {bias} — epilogue {epilogue!r} takes no bias")
        if bias.shape != (n,):
            raise ShapeError(f"{operands}, bias is {bias} — bias must have shape ({n},)")
    ld_out = None
    if out is not None:
        if out.shape != out_shape:
            raise ShapeError(f"{operands}, out is {out} — out must have shape {out_shape}")
        if has_internal_overlap(out):
            raise AliasError(f"{operands}, out is {out} — out has overlapping elements (a broadcast view)")
        ld_out = _as_result(out, a_vec, b_vec, n)

    logical = {"a": la, "b": lb} if lc is None else {"a": la, "b": lb, "c": lc}
    copies = {name for name, meta in logical.items() if not _describable(meta, row_major_only=name == "c")}
    for name in copies:
        if name == "a":
            logical[name] = _logical(_contiguous(a), transpose_a, "a", promote_row=True, operands=operands)
        elif name == "b":
            logical[name] = _logical(_contiguous(b), transpose_b, "b", promote_row=False, operands=operands)
        else:
            assert c is not None
            logical[name] = _as_result(_contiguous(c), a_vec, b_vec, n)
    if bias is not None and n > 1 and bias.strides[0] != 1:
        copies.add("bias")
    out_via_temp = ld_out is not None and not _describable(ld_out, row_major_only=True)
    d = (
        ld_out
        if ld_out is not None and not out_via_temp
        else _contiguous(TensorMeta(batch_shape + (m, n), (), result_dtype, device))
    )
    vendor_batch, rows = batch_shape, m
    folded = _fold_rows(logical, d, batch_shape)
    if folded is not None:  # a batch of a over a b that has none: one GEMM with the batch in its rows
        logical, d = folded
        vendor_batch, rows = (), logical["a"].shape[0]
    aux_shape, bias_grad_length = _check_training(a, b, kind, (rows, n, k), folded is not None, aux, bias_grad)
    matrices, batch_count, offsets = _matrices(logical, d, vendor_batch, (rows, n, k), dtype, result_dtype)
    given = Operands(a=a, b=b, c=c, d=out, bias=bias, aux=aux, bias_grad=bias_grad)
    return Problem(
        dtype=dtype,
        result_dtype=result_dtype,
        device=device,
        m=rows,
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
        matrices=matrices,
        batch_count=batch_count,
        outer_offsets=offsets,
        byte_extents=Operands(*(None if meta is None else meta.byte_extent() for meta in given)),
        aux_shape=aux_shape,
        bias_grad_length=bias_grad_length,
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


def _fold_rows(
    logical: dict[str, TensorMeta], d: TensorMeta, batch_shape: tuple[int, ...]
) -> tuple[dict[str, TensorMeta], TensorMeta] | None:
    """a, b, c and d as one GEMM whose rows run over the batch, when b has no batch and a, c and d each lay
    their batch and rows out as one row-major ``(B·M) × cols`` matrix (a contiguous ``(B, T, d)`` activation
    times a weight, say); else None."""
    rows = math.prod(batch_shape) * logical["a"].shape[-2]
    if not batch_shape or rows == 0 or rows > MAX_DIM or any(size != 1 for size in logical["b"].shape[:-2]):
        return None
    folded = {"b": TensorMeta(logical["b"].shape[-2:], logical["b"].strides[-2:], logical["b"].dtype,
                              logical["b"].device)}  # fmt: skip
    for name, meta in (*((n, logical[n]) for n in ("a", "c") if n in logical), ("d", d)):
        if meta.shape[:-2] != batch_shape and math.prod(batch_shape) > 1:  # c broadcast over the batch
            return None
        as_rows = _as_rows(meta)
        if as_rows is None:
            return None
        folded[name] = as_rows
    return folded, folded.pop("d")


def _as_rows(meta: TensorMeta) -> TensorMeta | None:
    """A row-major batch ``(…, M, cols)`` whose batch and row dims step evenly as one ``(B·M) × cols`` matrix."""
    cols, col_stride = meta.shape[-1], meta.strides[-1]
    if col_stride != 1 and cols > 1:
        return None
    steps = [(size, stride) for size, stride in zip(meta.shape[:-1], meta.strides[:-1]) if size != 1]
    for (_, outer), (size, inner) in zip(steps, steps[1:]):
        if outer != size * inner:
            return None
    ld = steps[-1][1] if steps else max(cols, 1)
    if ld < max(cols, 1):
        return None
    return TensorMeta((math.prod(meta.shape[:-1]), cols), (ld, 1), meta.dtype, meta.device)


def _check_training(
    a: TensorMeta,
    b: TensorMeta,
    kind: epilogues.Epilogue,
    mnk: tuple[int, int, int],
    folded: bool,
    aux: TensorMeta | None,
    bias_grad: TensorMeta | None,
) -> tuple[tuple[int, int] | None, int]:
    """The aux shape and bias-gradient length of a training epilogue; its operands checked.

    ``mnk``: the vendor's M (a batch folded into rows counts in it), N and K.
    """
    operands = names(a, b)
    m, n, k = mnk
    if not kind.training:
        for name, meta in (("aux", aux), ("bias_grad", bias_grad)):
            if meta is not None:
                raise OptionError(f"{operands}, {name} is {meta} — epilogue {kind.name!r} has no {name}")
        return None, 0
    needs_k = kind.aux_in != "none" or kind.bias_grad != "none"
    if min(m, n) == 0 or (needs_k and k == 0):
        raise ShapeError(f"{operands} — epilogue {kind.name!r} needs M, N{' and K' if needs_k else ''} ≥ 1")
    rows_only = kind.bias_grad not in ("a", "b")  # bgrad_a / bgrad_b reduce an operand: plain matrices only
    if len(a.shape) < 2 or len(b.shape) != 2 or (len(a.shape) > 2 and not (folded and rows_only)):
        raise ShapeError(
            f"{operands} — epilogue {kind.name!r} needs a 2-D b and a 2-D a"
            + (", or a batch of a laid out as rows (a contiguous (…, M, K) a)" if rows_only else "")
        )
    aux_shape = None
    if kind.aux != "none":
        aux_shape = epilogues.aux_shape(kind.name, m, n)
        if aux is None and kind.aux_in != "none":
            raise OptionError(f"{operands} — epilogue {kind.name!r} reads aux (the {kind.aux}_aux of the forward)")
        if aux is not None and (aux.shape != aux_shape or aux.strides != (aux_shape[1], 1)):
            raise ShapeError(
                f"{operands}, aux is {aux} — aux must be a contiguous {aux_shape} matrix "
                f"(rows padded: gemmbridge.epilogues.aux_shape)"
            )
    elif aux is not None:
        raise OptionError(f"{operands}, aux is {aux} — epilogue {kind.name!r} has no aux")
    length = 0
    if kind.bias_grad != "none":
        length = epilogues.bias_grad_length(kind.name, m, n)
        if bias_grad is not None and (bias_grad.shape != (length,) or (length > 1 and bias_grad.strides != (1,))):
            raise ShapeError(
                f"{operands}, bias_grad is {bias_grad} — bias_grad must be a contiguous ({length},) vector"
            )
    elif bias_grad is not None:
        raise OptionError(f"{operands}, bias_grad is {bias_grad} — epilogue {kind.name!r} has no bias_grad")
    return aux_shape, length


def _matrices(
    logical: dict[str, TensorMeta],
    d: TensorMeta,
    batch_shape: tuple[int, ...],
    mnk: tuple[int, int, int],
    dtype: str,
    result_dtype: str,
) -> tuple[Operands, int, tuple[Operands, ...]]:
    """The matrices of a, b, c, d, the one-call batch count and the outer offsets."""
    m, n, k = mnk
    metas = [logical["a"], logical["b"], logical.get("c", d), d]
    batch_count, inner, outer = _collapse(batch_shape, [_batch_strides(meta, batch_shape) for meta in metas])
    found = []
    for j, (rows, cols) in enumerate(((m, k), (k, n), (m, n), (m, n))):
        meta = metas[j]
        order = _matrix_order(rows, cols, meta.strides[-2], meta.strides[-1])
        assert order is not None
        row_major, ld = order
        itemsize = ITEMSIZE[dtype if j < 2 else result_dtype]
        align = _alignment(itemsize, ld, inner[j], *(st[j] for _, st in outer))
        found.append(Matrix(rows, cols, row_major, ld, inner[j], align))
    return Operands(*found), batch_count, _outer_offsets(outer)
