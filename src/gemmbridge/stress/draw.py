"""The stress mix: seeded random calls to ``gemmbridge.matmul``, valid and failing, on any framework.

Valid calls: shapes 0..``max_dim`` per dimension, 1-D operands, 0–2 broadcast batch dims, every dtype,
transpose flags, transposed and row-strided views, ``c``/``alpha``/``beta``/``bias``/``epilogue``, ``out=``
(sometimes ``out=c``), TF32. Failing calls (bad shapes, dtypes, aliasing, options, operand types) must raise
the named ``GemmError`` and leave ``out`` untouched. Arrays are made by ``gemmbridge.testing.Framework``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import errors
from ..testing import Framework

DTYPES = ("float32", "float64", "float16", "bfloat16")  # the order draws pick from (a seed replays it)
SCALARS = (1.0, -1.0, 0.5, 2.0, -0.75, 0.25, 1.5)  # exact in every dtype, so the reference uses the same values
EPILOGUES = ("none", "none", "relu", "gelu")
VIEWS = ("contiguous", "contiguous", "transposed", "row_strided")  # testing.LAYOUTS the mix draws from


def _dtypes(fw: Framework) -> tuple[str, ...]:
    return tuple(d for d in DTYPES if d in fw.dtypes)


@dataclass
class Call:
    """One drawn call: what to pass, what it is, and what must happen."""

    text: str
    fw: Framework
    args: tuple
    kwargs: dict
    dtype: str = "float32"
    expect: type[Exception] | None = None  # the GemmError subclass a failing call must raise
    inputs64: dict[str, Any] = field(default_factory=dict)  # float64 copies for the reference (checked calls)
    k: int = 0


class Drawer:
    """Draws calls from a seeded ``random.Random`` (decisions) and numpy Generator (data).

    With ``problems``, each call's decisions (framework, dtype, shapes, views, options, failure kind) come
    from one of that many fixed seeds, picked at random: the calls repeat a bounded set of problems (that
    many valid ones and that many failing ones), as a training loop does, while the data is fresh on every
    call.
    """

    def __init__(self, seed: int, frameworks: list[Framework], max_dim: int, problems: int | None = None) -> None:
        self.rnd = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.frameworks, self.max_dim = frameworks, max_dim
        if problems is not None and problems < 0:
            raise ValueError(f"Drawer: problems={problems}: None or 0 (a new problem each call) or more")
        self.structures = [self.rnd.randrange(1 << 62) for _ in range(problems or 0)]

    @contextlib.contextmanager
    def _structure(self, structure: int | None = None) -> Iterator[None]:
        """Decisions from the fixed seed ``structure``, else from one of the set picked at random (bounded
        set), else from the running sequence."""
        if structure is None and not self.structures:
            yield
            return
        running = self.rnd
        self.rnd = random.Random(running.choice(self.structures) if structure is None else structure)
        try:
            yield
        finally:
            self.rnd = running

    def nth(self, index: int, checked: bool) -> Call:
        """Call ``index`` of one pass over the bounded set: its valid problems in turn, then its failing ones."""
        count = len(self.structures)
        with self._structure(self.structures[index % count]):
            return self._valid(checked) if index < count else self._failing()

    def dim(self) -> int:
        roll = self.rnd.random()
        if roll < 0.03:
            return 0
        if roll < 0.10:
            return 1
        if roll < 0.40:
            return self.rnd.randint(2, 16)
        return self.rnd.randint(2, max(2, self.max_dim))

    def data(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        if dtype == "float64":
            return self.rng.standard_normal(shape)
        return self.rng.standard_normal(shape, dtype=np.float32)

    def array(self, fw: Framework, shape: tuple[int, ...], dtype: str) -> Any:
        """A contiguous array of random data in ``dtype``."""
        return fw.from_numpy(self.data(shape, dtype), dtype)

    def poisoned_out(self, fw: Framework, shape: tuple[int, ...], dtype: str) -> Any:
        """A NaN-filled out= (unwritten elements show): contiguous, a transposed view (written through a
        temporary), or a row-strided slice of a larger buffer (written in place with its leading dim)."""
        layout = self.rnd.choice(VIEWS) if len(shape) >= 2 else "contiguous"
        return fw.out_view(shape, dtype, layout)[1]

    def operand(self, fw: Framework, shape: tuple[int, ...], dtype: str, layout: str | None = None) -> Any:
        """A random array of logical ``shape``: contiguous, a transposed view, or a row-strided view."""
        views = len(shape) >= 2 and fw.name != "jax"  # JAX arrays have no strides to vary
        if not views:
            layout = "contiguous"
        elif layout is None:
            layout = self.rnd.choice(VIEWS)
        return fw.view(self.data(shape, dtype), dtype, layout, self.rng)

    def batches(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        dims = tuple(self.rnd.randint(1, 3) for _ in range(self.rnd.choice((0, 0, 1, 2))))
        a = tuple(d if self.rnd.random() < 0.8 else 1 for d in dims)
        b = tuple(d if self.rnd.random() < 0.8 else 1 for d in dims)
        if dims and self.rnd.random() < 0.25:
            b = b[1:]  # fewer batch dims: broadcast
        return a, b

    def valid(self, checked: bool) -> Call:
        with self._structure():
            return self._valid(checked)

    def _valid(self, checked: bool) -> Call:
        fw = self.rnd.choice(self.frameworks)
        dtype = self.rnd.choice(_dtypes(fw))
        m, n, k = self.dim(), self.dim(), self.dim()
        vec_a, vec_b = self.rnd.random() < 0.05, self.rnd.random() < 0.05
        a_batch, b_batch = self.batches()
        ta = not vec_a and self.rnd.random() < 0.3
        tb = not vec_b and self.rnd.random() < 0.3
        a_shape = (k,) if vec_a else a_batch + ((k, m) if ta else (m, k))
        b_shape = (k,) if vec_b else b_batch + ((n, k) if tb else (k, n))
        a, b = self.operand(fw, a_shape, dtype), self.operand(fw, b_shape, dtype)
        kwargs: dict[str, Any] = {}
        if ta:
            kwargs["transpose_a"] = True
        if tb:
            kwargs["transpose_b"] = True
        batch = np.broadcast_shapes(a_batch if not vec_a else (), b_batch if not vec_b else ())
        out_shape = batch + (() if vec_a else (m,)) + (() if vec_b else (n,))
        matrices = not (vec_a or vec_b)
        if matrices and self.rnd.random() < 0.3:
            c_shape = out_shape if self.rnd.random() < 0.7 else out_shape[-2:]
            kwargs["c"] = self.operand(fw, c_shape, dtype)
            kwargs["beta"] = self.rnd.choice(SCALARS)
        if self.rnd.random() < 0.3:
            kwargs["alpha"] = self.rnd.choice(SCALARS)
        if matrices and self.rnd.random() < 0.3:
            kwargs["bias"] = self.array(fw, (n,), dtype)
        if matrices:
            kwargs["epilogue"] = self.rnd.choice(EPILOGUES)
        tf32 = dtype == "float32" and self.rnd.random() < 0.2
        if tf32:
            kwargs["allow_tf32"] = True
        elif dtype == "float32" and fw.name == "jax":
            kwargs["allow_tf32"] = False  # JAX's default precision may be TF32 on a GPU; the others default to off
        inputs64 = {}
        if checked:  # before the call: out=c overwrites c
            inputs64 = {"a": fw.to_numpy64(a), "b": fw.to_numpy64(b)}
            inputs64.update({name: fw.to_numpy64(kwargs[name]) for name in ("c", "bias") if name in kwargs})
        if fw.mutable and self.rnd.random() < 0.25:
            c = kwargs.get("c")
            if c is not None and tuple(c.shape) == out_shape and self.rnd.random() < 0.5:
                kwargs["out"] = c  # accumulate in place
            else:
                kwargs["out"] = self.poisoned_out(fw, out_shape, dtype)
        text = f"{fw} {'tf32' if tf32 else dtype} a{tuple(a.shape)} b{tuple(b.shape)} " + " ".join(
            f"{key}={_short(value)}" for key, value in kwargs.items()
        )
        return Call(text, fw, (a, b), kwargs, "tf32" if tf32 else dtype, None, inputs64, k)

    def largest(self, fw: Framework, dtype: str) -> Call:
        """The largest call the mix can draw (every dim at its maximum, 3×3 batch, strided c and out=),
        checked: run first, so that every pool sized by the largest problem is at its size before the
        warm-up sample (the allocators' and the driver's staging buffers keep their high-water mark)."""
        shape = (3, 3, self.max_dim, self.max_dim)
        a, b, c = (self.operand(fw, shape, dtype, "row_strided") for _ in range(3))
        kwargs: dict[str, Any] = {"c": c, "beta": 0.5, "bias": self.array(fw, shape[-1:], dtype)}
        kwargs["epilogue"] = "gelu"
        inputs64 = {name: fw.to_numpy64(x) for name, x in (("a", a), ("b", b), ("c", c), ("bias", kwargs["bias"]))}
        if fw.mutable:
            kwargs["out"] = fw.poisoned(shape, dtype)
        text = f"{fw} {dtype} largest a{shape} b{shape} c, bias, gelu, out="
        return Call(text, fw, (a, b), kwargs, dtype, None, inputs64, self.max_dim)

    def failing(self) -> Call:
        """A call that must raise a GemmError (and write nothing into ``out``)."""
        with self._structure():
            return self._failing()

    def _failing(self) -> Call:
        fw = self.rnd.choice(self.frameworks)
        dtype = self.rnd.choice(_dtypes(fw))
        m, n, k = (self.rnd.randint(1, 24) for _ in range(3))
        a = self.array(fw, (m, k), dtype)
        b = self.array(fw, (k, n), dtype)
        out = fw.poisoned((m, n), dtype) if fw.mutable and self.rnd.random() < 0.5 else None
        with_out = {} if out is None else {"out": out}
        kinds: list[tuple[str, tuple, dict, type[Exception]]] = [
            ("inner dims differ", (a, self.array(fw, (k + 1, n), dtype)), with_out, errors.ShapeError),
            ("mixed dtypes", (a, self.array(fw, (k, n), _other(dtype, fw))), with_out, errors.DTypeError),
            ("int32 operands", (self.array(fw, (m, k), "int32"), self.array(fw, (k, n), "int32")),
             {}, errors.DTypeError),
            ("unknown epilogue", (a, b), {"epilogue": "swish", **with_out}, errors.OptionError),
            ("bias of the wrong length", (a, b), {"bias": self.array(fw, (n + 1,), dtype), **with_out},
             errors.ShapeError),
            ("c of the wrong shape", (a, b), {"c": self.array(fw, (m, n + 1), dtype), **with_out},
             errors.ShapeError),
            ("transpose of a vector", (self.array(fw, (k,), dtype), b), {"transpose_a": True, **with_out},
             errors.OptionError),
            ("not an array", (a, [[1.0] * n] * k), with_out, errors.OperandTypeError),
            ("operands of two frameworks", (a, _foreign(fw, self.data((k, n), dtype), dtype)), with_out,
             errors.OperandTypeError),
        ]  # fmt: skip
        if fw.mutable:
            out_bad = fw.poisoned((m + 1, n), dtype)
            kinds.append(("out of the wrong shape", (a, b), {"out": out_bad}, errors.ShapeError))
            square = self.array(fw, (m, m), dtype)
            kinds.append(("out aliases a", (square, self.array(fw, (m, m), dtype)), {"out": square},
                          errors.AliasError))  # fmt: skip
        text, args, kwargs, expect = self.rnd.choice(kinds)
        return Call(f"{fw} {dtype} failing: {text}", fw, args, kwargs, dtype, expect)


def _other(dtype: str, fw: Framework) -> str:
    return next(d for d in _dtypes(fw) if d != dtype)


def _foreign(fw: Framework, arr: np.ndarray, dtype: str) -> Any:
    """``arr`` in another framework than ``fw`` (numpy, or torch when ``fw`` is numpy)."""
    if fw.name != "numpy":
        return arr.astype(np.float32)
    try:
        import torch

        return torch.from_numpy(arr.astype(np.float32))
    except ImportError:
        return arr.tolist()


def _short(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}{tuple(shape)}" if shape is not None else repr(value)
