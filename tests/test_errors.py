"""Bad inputs: the specific exception, a message naming the operands, out= untouched, and a working next call.

Each case builds the keyword arguments of one bad ``matmul`` call in a given
framework. The same table drives two tests: one for the exception class and
the state afterwards, one for the message, which names the operands with
their shapes, dtypes and devices. ``scripts/error_table.py`` writes the table
to ``docs/errors.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import Framework

import gemmbridge
from gemmbridge import errors

F32 = "float32"


def native(fw: Framework, arr: np.ndarray) -> Any:
    """``arr`` (any numpy dtype) as ``fw``'s array, on the CPU."""
    if fw.name == "torch":
        return fw.xp.from_numpy(np.array(arr))
    if fw.name == "jax":
        return fw.jax.device_put(arr, fw.jax.devices("cpu")[0])
    return np.array(arr)


def rand(fw: Framework, rng: np.random.Generator, shape: tuple[int, ...], dtype: str = F32) -> Any:
    return fw.from_numpy(rng.standard_normal(shape), dtype)


def expanded(fw: Framework, shape: tuple[int, int]) -> Any:
    """A writable NaN-filled view whose rows all share one buffer (stride 0)."""
    row = fw.poisoned((shape[1],), F32)
    if fw.name == "numpy":
        return np.lib.stride_tricks.as_strided(row, shape=shape, strides=(0, row.itemsize), writeable=True)
    return row.expand(shape)


def out_sharing_c(fw: Framework, rng: np.random.Generator) -> dict:
    """out and c are rows 1.. and ..-1 of one buffer: they overlap without being the same view."""
    buf = rand(fw, rng, (6, 5))
    return {"a": rand(fw, rng, (5, 3)), "b": rand(fw, rng, (3, 5)), "c": buf[:5], "out": buf[1:]}


def out_is_transposed_c(fw: Framework, rng: np.random.Generator) -> dict:
    """c is out transposed: the same pointer and extent, but not the same view."""
    c = rand(fw, rng, (4, 4))
    return {"a": rand(fw, rng, (4, 3)), "b": rand(fw, rng, (3, 4)), "c": c, "out": fw.mT(c)}


def bias_inside_out(fw: Framework, rng: np.random.Generator) -> dict:
    out = fw.poisoned((4, 5), F32)
    return {"a": rand(fw, rng, (4, 3)), "b": rand(fw, rng, (3, 5)), "bias": out[2], "out": out}


def on_meta_device(fw: Framework, rng: np.random.Generator) -> dict:
    """torch tensors on the "meta" device (neither cpu nor cuda)."""
    return {"a": fw.xp.empty((3, 4), device="meta"), "b": fw.xp.empty((4, 5), device="meta")}


def on_gpu(*names: str, **extra_shapes: Any) -> Callable:
    """A valid torch call (a (3, 4), b (4, 5), extras by shape) with the operands ``names`` moved to the GPU."""

    def build(fw: Framework, rng: np.random.Generator) -> dict:
        if not fw.xp.cuda.is_available():
            pytest.skip("needs a CUDA device")
        kw = _kw((3, 4), (4, 5), **extra_shapes)(fw, rng)
        return {name: x.cuda() if name in names else x for name, x in kw.items()}

    return build


NAMES_A_B = "the message does not give this operand's shape, dtype and device"


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Framework, np.random.Generator], dict]
    error: type[errors.GemmError]
    builtin: type[Exception]
    frameworks: tuple[str, ...] = ("numpy", "torch")
    names: tuple[str, ...] = ("a", "b")  # operands whose "<name> is <shape> <dtype> on <device>" the message gives
    culprit: str | None = None  # the extra operand (c, bias, out) the message must name too
    by_type: bool = False  # the culprit is no array: the message names its Python type instead
    marks: tuple = ()


def _kw(a_shape, b_shape, dtype_a=F32, dtype_b=F32, **extra_shapes):
    """Builder of random a, b (and extra float32 operands by shape)."""

    def build(fw: Framework, rng: np.random.Generator) -> dict:
        kw = {"a": rand(fw, rng, a_shape, dtype_a), "b": rand(fw, rng, b_shape, dtype_b)}
        for name, spec in extra_shapes.items():
            shape, dtype = spec if isinstance(spec[-1], str) else (spec, F32)
            kw[name] = fw.poisoned(shape, dtype) if name == "out" else rand(fw, rng, shape, dtype)
        return kw

    return build


def _np_dtype(dtype: str) -> Callable[[Framework, np.random.Generator], dict]:
    def build(fw: Framework, rng: np.random.Generator) -> dict:
        x = (rng.standard_normal((3, 4)) * 4).astype(dtype)
        return {"a": native(fw, x), "b": native(fw, x.T.copy())}

    return build


def _zero_d(name: str) -> Callable:
    """Operand ``name`` is a 0-d array."""

    def build(fw: Framework, rng: np.random.Generator) -> dict:
        kw = {"a": rand(fw, rng, (3, 4)), "b": rand(fw, rng, (4,))}
        kw[name] = native(fw, np.float32(2.0))
        return kw

    return build


def _out_is(name: str, transpose: bool = False) -> Callable:
    """out is operand ``name`` itself (or its transposed view)."""

    def build(fw: Framework, rng: np.random.Generator) -> dict:
        kw = {"a": rand(fw, rng, (4, 4)), "b": rand(fw, rng, (4, 4))}
        kw["out"] = fw.mT(kw[name]) if transpose else kw[name]
        return kw

    return build


def _with(build: Callable, **options: Any) -> Callable:
    return lambda fw, rng: {**build(fw, rng), **options}


def _non_array(which: str, value: Any) -> Callable:
    return lambda fw, rng: {**_kw((3, 4), (4, 5))(fw, rng), which: value}


def huge(fw: Framework, rng: np.random.Generator) -> dict:
    """M = 2**31 through a stride-0 view: beyond the vendor libraries' 32-bit dimensions, using 4 bytes."""
    row = rand(fw, rng, (1, 1))
    a = np.broadcast_to(row, (2**31, 1)) if fw.name == "numpy" else row.expand(2**31, 1)
    return {"a": a, "b": rand(fw, rng, (1, 3))}


def read_only_out(fw: Framework, rng: np.random.Generator) -> dict:
    out = fw.poisoned((3, 5), F32)
    out.setflags(write=False)
    return {"a": rand(fw, rng, (3, 4)), "b": rand(fw, rng, (4, 5)), "out": out}


CASES = [
    Case("inner-dims-differ", _kw((3, 4), (5, 6)), errors.ShapeError, ValueError),
    Case("inner-dims-differ-transposed", _with(_kw((3, 4), (5, 4)), transpose_a=True), errors.ShapeError, ValueError),
    Case("batch-not-broadcastable", _kw((2, 3, 4), (3, 4, 5)), errors.ShapeError, ValueError),
    Case("batch-not-broadcastable-4d", _kw((2, 3, 3, 4), (4, 1, 4, 5)), errors.ShapeError, ValueError),
    Case("dtypes-differ", _kw((3, 4), (4, 5), F32, "float64"), errors.DTypeError, TypeError),
    Case("dtypes-differ-half", _kw((3, 4), (4, 5), "float16", "bfloat16"), errors.DTypeError, TypeError),
    Case("int32", _np_dtype("int32"), errors.DTypeError, TypeError),
    Case("complex64", _np_dtype("complex64"), errors.DTypeError, TypeError),
    Case("bool", _np_dtype("bool"), errors.DTypeError, TypeError),
    Case("0-d-a", _zero_d("a"), errors.ShapeError, ValueError),
    Case("0-d-b", _zero_d("b"), errors.ShapeError, ValueError),
    Case("b-list", _non_array("b", [[1.0] * 5] * 4), errors.OperandTypeError, TypeError, culprit="b", by_type=True,
         names=()),
    Case("b-float", _non_array("b", 2.0), errors.OperandTypeError, TypeError, culprit="b", by_type=True, names=()),
    Case("b-None", _non_array("b", None), errors.OperandTypeError, TypeError, culprit="b", by_type=True, names=()),
    Case("a-list", _non_array("a", [[1.0] * 4] * 3), errors.OperandTypeError, TypeError, culprit="a", by_type=True,
         names=()),
    Case("c-float", _non_array("c", 1.0), errors.OperandTypeError, TypeError, culprit="c", by_type=True, names=()),
    Case("out-wrong-shape", _kw((3, 4), (4, 5), out=(5, 3)), errors.ShapeError, ValueError, culprit="out"),
    Case("out-wrong-rank", _kw((2, 3, 4), (4, 5), out=(3, 5)), errors.ShapeError, ValueError, culprit="out"),
    Case("out-wrong-dtype", _kw((3, 4), (4, 5), out=((3, 5), "float64")), errors.DTypeError, TypeError,
         culprit="out"),
    Case("out-is-a", _out_is("a"), errors.AliasError, ValueError, culprit="out"),
    Case("out-is-b", _out_is("b"), errors.AliasError, ValueError, culprit="out"),
    Case("out-is-a-transposed", _out_is("a", transpose=True), errors.AliasError, ValueError, culprit="out"),
    Case("out-overlaps-c", out_sharing_c, errors.AliasError, ValueError, culprit="out"),
    Case("out-is-c-transposed", out_is_transposed_c, errors.AliasError, ValueError, culprit="out"),
    Case("out-contains-bias", bias_inside_out, errors.AliasError, ValueError, culprit="out"),
    Case("out-expanded", lambda fw, rng: {**_kw((4, 3), (3, 5))(fw, rng), "out": expanded(fw, (4, 5))},
         errors.AliasError, ValueError, culprit="out"),
    Case("bias-wrong-shape", _kw((3, 4), (4, 5), bias=(4,)), errors.ShapeError, ValueError, culprit="bias"),
    Case("bias-2d", _kw((3, 4), (4, 5), bias=(1, 5)), errors.ShapeError, ValueError, culprit="bias"),
    Case("bias-wrong-dtype", _kw((3, 4), (4, 5), bias=((5,), "float16")), errors.DTypeError, TypeError,
         culprit="bias"),
    Case("c-wrong-shape", _kw((3, 4), (4, 5), c=(5, 3)), errors.ShapeError, ValueError, culprit="c"),
    Case("c-wrong-dtype", _kw((3, 4), (4, 5), c=((3, 5), "float64")), errors.DTypeError, TypeError, culprit="c"),
    Case("c-batch-not-broadcastable", _kw((2, 3, 3, 4), (4, 5), c=(4, 3, 5)), errors.ShapeError, ValueError,
         culprit="c"),
    Case("c-extra-batch", _kw((3, 4), (4, 5), c=(2, 3, 5)), errors.ShapeError, ValueError, culprit="c"),
    Case("epilogue-unknown", _with(_kw((3, 4), (4, 5)), epilogue="silu"), errors.OptionError, ValueError),
    Case("epilogue-uppercase", _with(_kw((3, 4), (4, 5)), epilogue="RELU"), errors.OptionError, ValueError),
    Case("epilogue-list", _with(_kw((3, 4), (4, 5)), epilogue=["relu"]), errors.OptionError, ValueError),
    Case("dims-beyond-32-bit", huge, errors.ShapeError, ValueError),
    Case("transpose-not-bool", _with(_kw((3, 4), (4, 5)), transpose_b="no"), errors.OptionError, ValueError),
    Case("alpha-array", lambda fw, rng: {**_kw((3, 4), (4, 5))(fw, rng), "alpha": rand(fw, rng, (1,))},
         errors.OptionError, ValueError),
    Case("beta-string", _with(_kw((3, 4), (4, 5), c=(3, 5)), beta="2"), errors.OptionError, ValueError),
    Case("out-read-only", read_only_out, errors.OptionError, ValueError, frameworks=("numpy",), culprit="out"),
    Case("epilogue-None", _with(_kw((3, 4), (4, 5)), epilogue=None), errors.OptionError, ValueError),
    Case("transpose_a-1d", _with(_kw((4,), (4, 5)), transpose_a=True), errors.OptionError, ValueError),
    Case("transpose_b-1d", _with(_kw((3, 4), (4,)), transpose_b=True), errors.OptionError, ValueError),
    Case("jax-out", _kw((3, 4), (4, 5), out=(3, 5)), errors.OptionError, ValueError, frameworks=("jax",)),
    Case("jax-inner-dims-differ", _kw((3, 4), (5, 6)), errors.ShapeError, ValueError, frameworks=("jax",)),
    Case("jax-dtypes-differ", _kw((3, 4), (4, 5), F32, "float64"), errors.DTypeError, TypeError, frameworks=("jax",)),
    Case("jax-int32", _np_dtype("int32"), errors.DTypeError, TypeError, frameworks=("jax",)),
    Case("unsupported-device", on_meta_device, errors.DeviceError, ValueError, frameworks=("torch",)),
    Case("a-on-gpu-b-on-cpu", on_gpu("a"), errors.DeviceError, ValueError, frameworks=("torch",),
         marks=(pytest.mark.gpu,)),
    Case("a-on-cpu-b-on-gpu", on_gpu("b"), errors.DeviceError, ValueError, frameworks=("torch",),
         marks=(pytest.mark.gpu,)),
    Case("c-on-cpu", on_gpu("a", "b", c=(3, 5)), errors.DeviceError, ValueError, frameworks=("torch",),
         culprit="c", marks=(pytest.mark.gpu,)),
    Case("out-on-cpu", on_gpu("a", "b", out=(3, 5)), errors.DeviceError, ValueError, frameworks=("torch",),
         culprit="out", marks=(pytest.mark.gpu,)),
    Case("out-on-gpu", on_gpu("out", out=(3, 5)), errors.DeviceError, ValueError, frameworks=("torch",),
         culprit="out", marks=(pytest.mark.gpu,)),
    Case("allow_tf32-string", _with(_kw((3, 4), (4, 5)), allow_tf32="no"), errors.OptionError, ValueError),
    Case("out_dtype-float16-from-float32", _with(_kw((3, 4), (4, 5)), out_dtype="float16"), errors.DTypeError,
         TypeError),
    Case("out_dtype-float32-from-float64", _with(_kw((3, 4), (4, 5), "float64", "float64"), out_dtype="float32"),
         errors.DTypeError, TypeError),
    Case("half-inputs-float32-out-without-out_dtype", _kw((3, 4), (4, 5), "bfloat16", "bfloat16", out=(3, 5)),
         errors.DTypeError, TypeError, culprit="out"),
    Case("half-bias-with-float32-result", _with(_kw((3, 4), (4, 5), "float16", "float16", bias=((5,), "float16")),
         out_dtype="float32"), errors.DTypeError, TypeError, culprit="bias"),
    Case("training-epilogue-batched-b", _with(_kw((2, 3, 4), (2, 4, 5)), epilogue="gelu_aux"), errors.ShapeError,
         ValueError),
    Case("bgrad-batched", _with(_kw((2, 3, 4), (4, 5)), epilogue="bgrad_b"), errors.ShapeError, ValueError),
    Case("training-epilogue-vector", _with(_kw((3, 4), (4,)), epilogue="bgrad_a"), errors.ShapeError, ValueError),
    Case("dgelu-without-aux", _with(_kw((3, 4), (4, 5)), epilogue="dgelu"), errors.OptionError, ValueError),
    Case("drelu-with-bias", lambda fw, rng: {**_kw((3, 4), (4, 5), bias=(5,))(fw, rng), "epilogue": "drelu",
         "aux": native(fw, np.zeros((3, 16), np.uint8))}, errors.OptionError, ValueError, culprit="bias"),
    Case("aux-wrong-shape", _with(_kw((3, 4), (4, 5), aux=(3, 5)), epilogue="dgelu"), errors.ShapeError,
         ValueError, culprit="aux"),
    Case("aux-wrong-dtype", _with(_kw((3, 4), (4, 5), aux=(3, 16)), epilogue="drelu"), errors.DTypeError,
         TypeError, culprit="aux"),
    Case("aux-without-an-aux-epilogue", _kw((3, 4), (4, 5), aux=(3, 8)), errors.OptionError, ValueError,
         culprit="aux"),
    Case("bias_grad-wrong-length", _with(_kw((3, 4), (4, 5), bias_grad=(5,)), epilogue="bgrad_a"),
         errors.ShapeError, ValueError, culprit="bias_grad"),
    Case("bias_grad-without-a-bgrad-epilogue", _kw((3, 4), (4, 5), bias_grad=(5,)), errors.OptionError, ValueError,
         culprit="bias_grad"),
    Case("bgrad-with-K=0", _with(_kw((3, 0), (0, 5)), epilogue="bgrad_b"), errors.ShapeError, ValueError),
    Case("bias_grad-inside-out", lambda fw, rng: _bias_grad_inside_out(fw, rng), errors.AliasError, ValueError,
         culprit="out"),
    Case("out-leaf-requires-grad", lambda fw, rng: _torch_out(fw, rng, "leaf"), errors.OptionError, ValueError,
         frameworks=("torch",), culprit="out"),
    Case("out-inference-tensor", lambda fw, rng: _torch_out(fw, rng, "inference"), errors.OptionError, ValueError,
         frameworks=("torch",), culprit="out"),
    Case("inputs-require-grad-with-out", lambda fw, rng: {**_requires_grad(fw, rng), "out": fw.poisoned((3, 5), F32)},
         errors.OptionError, ValueError, frameworks=("torch",)),
    Case("a-negative-bit", lambda fw, rng: _negative_bit(fw, rng), errors.OperandTypeError, TypeError,
         frameworks=("torch",), names=()),
    Case("a-sparse", lambda fw, rng: {**_kw((3, 4), (4, 5))(fw, rng), "a": rand(fw, rng, (3, 4)).to_sparse()},
         errors.OperandTypeError, TypeError, frameworks=("torch",), names=()),
    Case("a-sparse-csr", lambda fw, rng: {**_kw((3, 4), (4, 5))(fw, rng), "a": rand(fw, rng, (3, 4)).to_sparse_csr()},
         errors.OperandTypeError, TypeError, frameworks=("torch",), names=(),
         marks=(pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),)),
]  # fmt: skip


def _bias_grad_inside_out(fw: Framework, rng: np.random.Generator) -> dict:
    out = fw.poisoned((4, 5), F32)
    return {"a": rand(fw, rng, (4, 3)), "b": rand(fw, rng, (3, 5)), "epilogue": "bgrad_b", "bias_grad": out[1],
            "out": out}  # fmt: skip


def _torch_out(fw: Framework, rng: np.random.Generator, kind: str) -> dict:
    """An out that torch.mm(out=) refuses too: a leaf requiring grad, or an inference tensor outside inference mode."""
    if kind == "leaf":
        out = fw.poisoned((3, 5), F32).requires_grad_()
    else:
        with fw.xp.inference_mode():
            out = fw.poisoned((3, 5), F32)
    return {"a": rand(fw, rng, (3, 4)), "b": rand(fw, rng, (4, 5)), "out": out}


def _requires_grad(fw: Framework, rng: np.random.Generator) -> dict:
    return {"a": rand(fw, rng, (3, 4)).requires_grad_(), "b": rand(fw, rng, (4, 5))}


def _negative_bit(fw: Framework, rng: np.random.Generator) -> dict:
    """A real tensor with torch's lazy negation bit: the imaginary part of a conjugated complex tensor."""
    z = fw.xp.complex(rand(fw, rng, (3, 4)), rand(fw, rng, (3, 4)))
    return {"a": z.conj().imag, "b": rand(fw, rng, (4, 5))}


def _mixed(**where: str) -> Callable:
    """a, b (and c, bias, out) from the frameworks named; the first that differs from a's is the culprit."""

    def build(_fw: Framework, rng: np.random.Generator) -> dict:
        shapes = {"a": (3, 4), "b": (4, 5), "c": (3, 5), "bias": (5,), "out": (3, 5)}
        fws = {name: Framework(where.get(name, where["a"]), "cpu") for name in shapes}
        kw = {"a": rand(fws["a"], rng, shapes["a"]), "b": rand(fws["b"], rng, shapes["b"])}
        for name in ("c", "bias", "out"):
            if name in where:
                kw[name] = rand(fws[name], rng, shapes[name])
        return kw

    return build


MIXED = [
    Case("torch-a-numpy-b", _mixed(a="torch", b="numpy"), errors.OperandTypeError, TypeError, culprit="b",
         by_type=True, names=()),
    Case("numpy-a-torch-b", _mixed(a="numpy", b="torch"), errors.OperandTypeError, TypeError, culprit="b",
         by_type=True, names=()),
    Case("torch-numpy-c", _mixed(a="torch", c="numpy"), errors.OperandTypeError, TypeError, culprit="c",
         by_type=True, names=()),
    Case("torch-numpy-out", _mixed(a="torch", out="numpy"), errors.OperandTypeError, TypeError, culprit="out",
         by_type=True, names=()),
    Case("numpy-torch-bias", _mixed(a="numpy", bias="torch"), errors.OperandTypeError, TypeError, culprit="bias",
         by_type=True, names=()),
    Case("jax-a-numpy-b", _mixed(a="jax", b="numpy"), errors.OperandTypeError, TypeError, culprit="b", by_type=True,
         names=()),
]  # fmt: skip

PARAMS = [
    pytest.param(case, name, id=f"{name}-{case.id}", marks=case.marks) for case in CASES for name in case.frameworks
] + [pytest.param(case, "numpy", id=f"mixed-{case.id}") for case in MIXED]


def described(x: Any) -> str:
    """How an error message describes an array: ``(3, 4) float32 on cpu``."""
    device = str(x.device) if type(x).__module__ == "torch" else "cpu"
    return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on {device}"


def valid_call_works(fw: Framework, rng: np.random.Generator) -> None:
    a = rand(fw, rng, (3, 4))
    b = rand(fw, rng, (4, 5))
    c = rand(fw, rng, (3, 5))
    ref = fw.to_numpy64(a) @ fw.to_numpy64(b) + 0.5 * fw.to_numpy64(c)
    out = fw.poisoned((3, 5), F32) if fw.mutable else None
    result = gemmbridge.matmul(a, b, c=c, beta=0.5, out=out)
    fw.type_check(result)
    got = fw.to_numpy64(result)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("case, framework", PARAMS)
def test_bad_call_raises(case: Case, framework: str, rng: np.random.Generator) -> None:
    """The specific class (also the built-in one), out untouched, twice over, and the next call works."""
    fw = Framework(framework, "cpu")
    kwargs = case.build(fw, rng)
    out = kwargs.get("out")
    before = None if out is None or not hasattr(out, "shape") else fw.snapshot(out)
    for _ in range(2):  # the second time the problem may come from the cache
        with pytest.raises(case.error) as info:
            gemmbridge.matmul(**kwargs)
        assert isinstance(info.value, errors.GemmError)
        assert isinstance(info.value, case.builtin)
        assert type(info.value) is case.error
        if before is not None:
            assert fw.snapshot(out) == before, "a failed call wrote into out"
    valid_call_works(fw, rng)


@pytest.mark.parametrize("case, framework", PARAMS)
def test_bad_call_message(case: Case, framework: str, rng: np.random.Generator) -> None:
    """The message names a and b (and the culprit) as ``<name> is <shape> <dtype> on <device>``."""
    fw = Framework(framework, "cpu")
    kwargs = case.build(fw, rng)
    with pytest.raises(case.error) as info:
        gemmbridge.matmul(**kwargs)
    message = str(info.value)
    assert message.startswith("matmul: ")
    for name in case.names:
        assert f"{name} is {described(kwargs[name])}" in message, NAMES_A_B
    if case.culprit:
        x = kwargs[case.culprit]
        if case.by_type:
            assert f"{case.culprit} is a {type(x).__module__}.{type(x).__qualname__}" in message
        else:
            assert f"{case.culprit} is {described(x)}" in message


def test_alias_checked_on_cached_problem(rng: np.random.Generator) -> None:
    """A problem cached by a valid call with out= is still checked for aliasing when out is an input."""
    a, b = rng.standard_normal((4, 4)).astype(np.float32), rng.standard_normal((4, 4)).astype(np.float32)
    gemmbridge.matmul(a, b, out=np.full((4, 4), np.nan, np.float32))
    before = a.tobytes()
    with pytest.raises(errors.AliasError):
        gemmbridge.matmul(a, b, out=a)
    assert a.tobytes() == before


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_read_only_out(rng: np.random.Generator, dtype: str) -> None:
    fw = Framework("numpy", "cpu")
    out = fw.poisoned((3, 5), dtype)
    out.setflags(write=False)
    before = fw.snapshot(out)
    with pytest.raises(errors.GemmError, match=r"^matmul: .*out is \(3, 5\)") as info:
        gemmbridge.matmul(rand(fw, rng, (3, 4), dtype), rand(fw, rng, (4, 5), dtype), out=out)
    assert isinstance(info.value, ValueError)
    assert fw.snapshot(out) == before


def test_unhashable_epilogue(rng: np.random.Generator) -> None:
    fw = Framework("numpy", "cpu")
    with pytest.raises(errors.OptionError):
        gemmbridge.matmul(rand(fw, rng, (3, 4)), rand(fw, rng, (4, 5)), epilogue=["relu"])


def test_error_classes() -> None:
    """The hierarchy that ``except ValueError`` / ``except TypeError`` code relies on."""
    for cls, builtin in [
        (errors.ShapeError, ValueError),
        (errors.DTypeError, TypeError),
        (errors.DeviceError, ValueError),
        (errors.OperandTypeError, TypeError),
        (errors.AliasError, ValueError),
        (errors.OptionError, ValueError),
        (errors.BackendUnavailableError, RuntimeError),
        (errors.VendorError, RuntimeError),
        (errors.OutOfMemoryError, MemoryError),
    ]:
        assert issubclass(cls, errors.GemmError) and issubclass(cls, builtin)
        assert getattr(gemmbridge, cls.__name__) is cls
    assert errors.VendorError("x", status="CUBLAS_STATUS_NOT_SUPPORTED").status == "CUBLAS_STATUS_NOT_SUPPORTED"


def test_numpy_memory_error_is_out_of_memory_error() -> None:
    a = np.ones((1 << 21, 1), np.float64)
    with pytest.raises(errors.OutOfMemoryError, match=r"the result \(2097152, 2097152\) float64 \(32768.00 GiB\)"):
        gemmbridge.matmul(a, a.T)


@pytest.mark.parametrize("setter", ["set_autotune", "set_graphs"])
@pytest.mark.parametrize("value", ["x", 1, None])
def test_switches_refuse_what_is_not_a_bool_and_keep_their_setting(setter: str, value: Any) -> None:
    before = dict(gemmbridge.plan._settings)
    with pytest.raises(errors.OptionError, match=f"{setter}: enabled must be True or False, not {value!r}"):
        getattr(gemmbridge, setter)(value)
    assert gemmbridge.plan._settings == before


def test_a_valid_out_with_crossing_strides_is_written() -> None:
    """Shape (3, 2) with strides (2, 3) reaches six distinct elements: it is no alias of itself."""
    buf = np.full(8, np.nan)
    out = np.lib.stride_tricks.as_strided(buf, (3, 2), (16, 24))
    a, b = np.arange(6.0).reshape(3, 2), np.eye(2)
    assert gemmbridge.matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, a)


def test_interleaved_out_and_c_that_never_meet_are_accepted() -> None:
    buf = np.arange(24.0).reshape(3, 8)
    c, out = buf[:, 1::2], buf[:, ::2]
    want = np.eye(3) @ np.ones((3, 4)) + c
    assert gemmbridge.matmul(np.eye(3), np.ones((3, 4)), c=c, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_cpu_backend_warnings_point_at_the_callers_line() -> None:
    a = np.full((2, 2), 60000.0, np.float16)
    with pytest.warns(RuntimeWarning, match="overflow encountered in the CPU backend") as caught:
        gemmbridge.matmul(a, a)
    assert caught[0].filename == __file__


def test_a_meta_tensor_is_refused_after_a_cpu_call_of_the_same_layout() -> None:
    """CPU and meta tensors share get_device() == -1: the plan cache must still tell them apart."""
    torch = pytest.importorskip("torch")
    gemmbridge.matmul(torch.randn(3, 4), torch.randn(4, 5))
    with pytest.raises(errors.DeviceError, match="meta"):
        gemmbridge.matmul(torch.empty(3, 4, device="meta"), torch.empty(4, 5, device="meta"))


@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "-huge"])
def test_a_scalar_beyond_the_float_range_is_an_option_error_naming_the_operands(name, value) -> None:
    a, b = np.ones((2, 3)), np.ones((3, 4))
    with pytest.raises(
        gemmbridge.OptionError, match=rf"a is \(2, 3\) float64 on cpu, b is .* {name} \(int\) is beyond the float range"
    ):
        gemmbridge.matmul(a, b, c=np.ones((2, 4)), **{name: value})
