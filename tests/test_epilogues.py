"""Training epilogues, float32 results from half inputs, and plans: every framework and device against float64.

Each epilogue of ``gemmbridge.epilogues`` is run with fresh random operands (transposed or not, with
``c``, ``alpha``, ``beta`` and bias where it takes one) and every output it makes — the result, the
saved pre-activation or relu mask, the bias gradient — is compared with ``reference.expected``. The
``emulated-cuda`` framework runs the CUDA backend's own code with cuBLASLt emulated on the CPU.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from conftest import FRAMEWORKS, Framework
from emulated_gpu import EmulatedFramework, install
from test_contract import make

import gemmbridge as gb
from gemmbridge import epilogues
from gemmbridge.reference import expected

TRAINING = [e for e in epilogues.NAMES if epilogues.TABLE[e].training]
TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
GELU_TOL = {"float64": 1e-8, "float32": 5e-5}  # cuBLASLt's GELU is not evaluated to full precision


@pytest.fixture(params=[*FRAMEWORKS, pytest.param(("emulated", "cuda"), id="emulated-cuda")])
def tfw(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Every (framework, device) pair, and NumPy arrays through the emulated CUDA backend."""
    if request.param[0] == "emulated":
        install(monkeypatch)
        yield EmulatedFramework()
        gb.clear_cache()
    else:
        yield Framework(*request.param)


def uint8_array(fw: Framework, arr: np.ndarray) -> Any:
    """A uint8 array of ``fw`` on its device."""
    if fw.name == "torch":
        return fw.xp.from_numpy(np.ascontiguousarray(arr)).to(fw.device)
    if fw.name == "jax":
        return fw.jax.device_put(arr, fw.jax_device)
    if fw.name == "cupy":
        return fw.xp.asarray(arr)
    return fw.from_numpy(arr, "uint8")  # numpy, or the emulated device's memory


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / scale) if scale else float(np.abs(got).max(initial=0.0))


def tolerance(dtype: str, epilogue: str) -> float:
    gelu = "gelu" in epilogue
    return max(TOL[dtype], GELU_TOL.get(dtype, 0.0) if gelu else 0.0)


def aux_input(fw: Framework, rng: np.random.Generator, epilogue: str, m: int, n: int, dtype: str) -> tuple[Any, Any]:
    """An aux as a forward pass saves it (padded rows) and its unpadded float64 or bool meaning."""
    rows, width = epilogues.aux_shape(epilogue, m, n)
    if epilogues.TABLE[epilogue].aux == "gelu":
        padded = rng.standard_normal((rows, width)) * 2
        aux = fw.from_numpy(padded, dtype)
        return aux, fw.to_numpy64(aux)[:, :n]
    mask = rng.random((m, n)) < 0.5
    bits = np.zeros((rows, width * 8), bool)
    bits[:, :n] = mask
    return uint8_array(fw, np.packbits(bits, axis=1, bitorder="little")), mask


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("epilogue", TRAINING)
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("with_c", [False, True], ids=["", "c"])
def test_every_training_epilogue(tfw, rng, dtype, epilogue, transpose_a, transpose_b, with_c):
    kind = epilogues.TABLE[epilogue]
    m, k, n = 9, 7, 13  # N = 13: the aux rows are padded (gelu to 16 elements, relu to 128 bits)
    a, a64 = make(tfw, rng, (k, m) if transpose_a else (m, k), dtype)
    b, b64 = make(tfw, rng, (n, k) if transpose_b else (k, n), dtype)
    kwargs: dict = {"transpose_a": transpose_a, "transpose_b": transpose_b, "alpha": 1.5, "epilogue": epilogue}
    ref_kwargs = dict(kwargs)
    if with_c:
        kwargs["c"], ref_kwargs["c"] = make(tfw, rng, (m, n), dtype)
        kwargs["beta"] = ref_kwargs["beta"] = -0.5
    if kind.takes_bias:
        kwargs["bias"], ref_kwargs["bias"] = make(tfw, rng, (n,), dtype)
    if kind.aux_in != "none":
        kwargs["aux"], ref_kwargs["aux"] = aux_input(tfw, rng, epilogue, m, n, dtype)
    want = expected(a64, b64, **ref_kwargs)
    before = {name: tfw.snapshot(x) for name, x in kwargs.items() if hasattr(x, "shape")}

    result = gb.matmul(a, b, **kwargs)

    d = result[0] if isinstance(result, tuple) else result
    tfw.type_check(d)
    assert isinstance(result, tuple) == (kind.aux_out != "none" or kind.bias_grad != "none")
    got = tfw.to_numpy64(d)
    assert np.isfinite(got).all()
    assert rel(got, want["d"]) < tolerance(dtype, epilogue), f"d: {rel(got, want['d']):.3g}"
    if kind.aux_out == "gelu":
        aux = result[1]
        assert tuple(aux.shape) == epilogues.aux_shape(epilogue, m, n)
        assert str(aux.dtype).removeprefix("torch.") == dtype
        assert rel(tfw.to_numpy64(aux)[:, :n], want["pre"]) < tolerance(dtype, epilogue)
    elif kind.aux_out == "relu":
        aux = tfw.to_numpy64(result[1]).astype(np.uint8)
        assert aux.shape == epilogues.aux_shape(epilogue, m, n)
        mask = np.unpackbits(aux, axis=1, bitorder="little")[:, :n].astype(bool)
        clear = np.abs(want["pre"]) > 1e-2 * np.abs(want["pre"]).max()  # rounding may flip values at 0
        np.testing.assert_array_equal(mask[clear], (want["pre"] > 0)[clear])
    if kind.bias_grad != "none":
        grad = tfw.to_numpy64(result[1])
        assert grad.shape == want["bias_grad"].shape
        assert rel(grad, want["bias_grad"]) < tolerance(dtype, epilogue), f"bias_grad: {rel(grad, want['bias_grad'])}"
    assert {name: tfw.snapshot(x) for name, x in kwargs.items() if hasattr(x, "shape")} == before, "an input changed"


@pytest.mark.parametrize("epilogue", ["gelu_aux", "relu_aux", "dgelu", "drelu_bgrad"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_of_a_folds_into_the_rows(tfw, rng, epilogue, dtype):
    """x (B, T, d) times a 2-D weight: one GEMM of B·T rows; the aux holds B·T rows, the bias gradient sums all."""
    kind = epilogues.TABLE[epilogue]
    b_, t, k, n = 3, 5, 6, 12
    a, a64 = make(tfw, rng, (b_, t, k), dtype)
    w, w64 = make(tfw, rng, (n, k), dtype)
    kwargs: dict = {"transpose_b": True, "epilogue": epilogue}
    ref_kwargs = dict(kwargs)
    if kind.takes_bias:
        kwargs["bias"], ref_kwargs["bias"] = make(tfw, rng, (n,), dtype)
    if kind.aux_in != "none":
        kwargs["aux"], ref_kwargs["aux"] = aux_input(tfw, rng, epilogue, b_ * t, n, dtype)
        ref_kwargs["aux"] = ref_kwargs["aux"].reshape(b_, t, n)
    want = expected(a64, w64, **ref_kwargs)
    result = gb.matmul(a, w, **kwargs)
    d = result[0] if isinstance(result, tuple) else result
    assert tuple(d.shape) == (b_, t, n)
    assert rel(tfw.to_numpy64(d), want["d"]) < tolerance(dtype, epilogue)
    if kind.aux_out == "gelu":
        assert tuple(result[1].shape) == epilogues.aux_shape(epilogue, b_ * t, n)
        assert rel(tfw.to_numpy64(result[1])[:, :n], want["pre"].reshape(-1, n)) < tolerance(dtype, epilogue)
    if kind.bias_grad == "d":
        assert rel(tfw.to_numpy64(result[1]), want["d"].reshape(-1, n).sum(0)) < tolerance(dtype, epilogue)


@pytest.mark.parametrize("epilogue", ["drelu", "dgelu_bgrad", "gelu_aux"])
def test_a_permuted_strided_batch_that_is_copied_still_folds(tfw, rng, epilogue):
    """a's batch permuted and its columns strided: copied (on CUDA) and folded into rows. The CPU backend works on
    a as given, where the product follows a's strides: the derivative must still land in the result."""
    if tfw.name == "jax":
        pytest.skip("jax arrays have no strides")
    kind = epilogues.TABLE[epilogue]
    n = 7
    parent = tfw.from_numpy(rng.standard_normal((2, 3, 4, 10)), "float64")
    a = tfw.moveaxis(parent, 1, 0)[..., ::2]  # (3, 2, 4, 5): batch permuted, two non-unit strides
    a64 = tfw.to_numpy64(a)
    w, w64 = make(tfw, rng, (5, n), "float64")
    kwargs: dict = {"epilogue": epilogue}
    ref_kwargs = dict(kwargs)
    if kind.aux_in != "none":
        kwargs["aux"], ref_kwargs["aux"] = aux_input(tfw, rng, epilogue, 24, n, "float64")
        ref_kwargs["aux"] = ref_kwargs["aux"].reshape(3, 2, 4, n)
    want = expected(a64, w64, **ref_kwargs)
    result = gb.matmul(a, w, **kwargs)
    d = result[0] if isinstance(result, tuple) else result
    assert rel(tfw.to_numpy64(d), want["d"]) < 1e-8
    if kind.bias_grad == "d":
        assert rel(tfw.to_numpy64(result[1]), want["d"].reshape(-1, n).sum(0)) < 1e-8


@pytest.mark.parametrize("epilogue", ["gelu_aux", "relu_aux", "bgrad_a", "dgelu_bgrad"])
def test_given_outputs_are_written_in_place(tfw, rng, epilogue):
    """aux and bias_grad may be passed (preallocated, NaN-poisoned); the call writes them and returns them."""
    if not tfw.mutable:
        pytest.skip("immutable arrays: outputs cannot be passed")
    kind = epilogues.TABLE[epilogue]
    m, k, n = 6, 5, 8
    a, a64 = make(tfw, rng, (k, m), "float32")
    b, b64 = make(tfw, rng, (k, n), "float32")
    kwargs: dict = {"transpose_a": True, "epilogue": epilogue}
    ref_kwargs = dict(kwargs)
    if kind.aux_in != "none":
        kwargs["aux"], ref_kwargs["aux"] = aux_input(tfw, rng, epilogue, m, n, "float32")
    if kind.aux_out == "gelu":
        kwargs["aux"] = tfw.poisoned(epilogues.aux_shape(epilogue, m, n), "float32")
    elif kind.aux_out == "relu":
        kwargs["aux"] = uint8_array(tfw, np.full(epilogues.aux_shape(epilogue, m, n), 0xAB, np.uint8))
    if kind.bias_grad != "none":
        kwargs["bias_grad"] = tfw.poisoned((epilogues.bias_grad_length(epilogue, m, n),), "float32")
    out = tfw.poisoned((m, n), "float32")
    d, extra = gb.matmul(a, b, out=out, **kwargs)
    want = expected(a64, b64, **ref_kwargs)
    assert d is out and extra is kwargs.get("aux" if kind.aux_out != "none" else "bias_grad")
    assert rel(tfw.to_numpy64(out), want["d"]) < tolerance("float32", epilogue)
    if kind.aux_out == "gelu":
        assert rel(tfw.to_numpy64(extra)[:, :n], want["pre"]) < tolerance("float32", epilogue)
    if kind.bias_grad != "none":
        assert rel(tfw.to_numpy64(extra), want["bias_grad"]) < 1e-5


# -- float32 results from half inputs --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("epilogue", ["none", "gelu_aux", "dgelu_bgrad", "bgrad_a"])
def test_half_inputs_give_an_unrounded_float32_result(tfw, rng, dtype, epilogue):
    """Products of half values are exact in float32: a result rounded to the half type would miss 1e-5."""
    kind = epilogues.TABLE[epilogue]
    m, k, n = 16, 24, 8
    a, a64 = make(tfw, rng, (k, m), dtype)
    b, b64 = make(tfw, rng, (k, n), dtype)
    c, c64 = make(tfw, rng, (m, n), "float32")
    kwargs: dict = {"transpose_a": True, "c": c, "beta": 1.0, "epilogue": epilogue, "out_dtype": "float32"}
    ref_kwargs = {"transpose_a": True, "c": c64, "beta": 1.0, "epilogue": epilogue}
    if kind.aux_in != "none":
        kwargs["aux"], ref_kwargs["aux"] = aux_input(tfw, rng, epilogue, m, n, "float32")
    result = gb.matmul(a, b, **kwargs)
    d = result[0] if isinstance(result, tuple) else result
    assert str(d.dtype).removeprefix("torch.") == "float32"
    want = expected(a64, b64, **ref_kwargs)
    assert rel(tfw.to_numpy64(d), want["d"]) < tolerance("float32", epilogue)
    if kind.bias_grad != "none":
        assert rel(tfw.to_numpy64(result[1]), want["bias_grad"]) < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gradient_accumulates_in_place_in_float32(tfw, rng, dtype):
    """acc += xᵀ·dy with half activations and a float32 accumulator, written in place."""
    if not tfw.mutable:
        pytest.skip("immutable arrays")
    x, x64 = make(tfw, rng, (32, 6), dtype)
    dy, dy64 = make(tfw, rng, (32, 5), dtype)
    acc, acc64 = make(tfw, rng, (6, 5), "float32")
    for _ in range(3):
        gb.matmul(x, dy, transpose_a=True, c=acc, out=acc, out_dtype="float32")
        acc64 = acc64 + x64.T @ dy64
    assert rel(tfw.to_numpy64(acc), acc64) < 1e-5


# -- plans -----------------------------------------------------------------------------------------------


def test_a_plan_runs_new_operands_of_its_layout(tfw, rng):
    a, a64 = make(tfw, rng, (10, 6), "float32")
    b, b64 = make(tfw, rng, (8, 6), "float32")
    bias, bias64 = make(tfw, rng, (8,), "float32")
    with gb.Plan(a, b, transpose_b=True, bias=bias, epilogue="gelu_aux") as plan:
        assert "m=10, n=8, k=6" in repr(plan)
        for _ in range(3):
            a, a64 = make(tfw, rng, (10, 6), "float32")
            d, aux = plan.run(a, b, bias=bias, alpha=0.5)
            want = expected(a64, b64, transpose_b=True, bias=bias64, alpha=0.5, epilogue="gelu_aux")
            assert rel(tfw.to_numpy64(d), want["d"]) < 5e-5
            assert rel(tfw.to_numpy64(aux)[:, :8], want["pre"]) < 1e-5


def test_a_plan_refuses_operands_of_another_layout(tfw, rng):
    a, _ = make(tfw, rng, (10, 6), "float32")
    b, _ = make(tfw, rng, (6, 8), "float32")
    plan = gb.Plan(a, b)
    other, _ = make(tfw, rng, (11, 6), "float32")
    with pytest.raises(gb.OptionError, match=r"^Plan.run: a is \(11, 6\) .* — a is \(11, 6\) .*, the plan's \(10, 6\)"):
        plan.run(other, b)
    with pytest.raises(gb.OptionError, match=r"c is \(10, 8\) float32 on \S+, the plan's absent"):
        plan.run(a, b, c=make(tfw, rng, (10, 8), "float32")[0])


def test_the_plan_cache_serves_every_thread(monkeypatch, rng):
    """A plan made by one thread is found by the others (autograd runs backward on a thread of its own)."""
    from gemmbridge import plan as plans

    described: list[tuple] = []
    real = plans.describe
    monkeypatch.setattr(plans, "describe", lambda *a, **k: described.append(a[0].shape) or real(*a, **k))
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    gb.matmul(a, b)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gb.matmul(a, b))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.allclose(r, a @ b) for r in results)
    assert described == [(5, 4)] and gb.cache_size() == 1
