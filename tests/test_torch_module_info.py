"""torch's own generic module checks on ``gemmbridge.torch.Linear``, beside ``nn.Linear`` itself.

torch tests every module of ``torch.testing._internal.common_modules.module_db`` with the generic checks of its
``test/test_modules.py`` (forward against a reference, factory kwargs, repr, pickling, non-contiguous inputs,
gradcheck and gradgradcheck, the training flag, construction on the meta device, and on a GPU device transfers
and CPU/GPU parity). That file is not in the wheel, but ``module_db`` is: this harness runs the same kinds of
check over the ``ModuleInfo`` of ``nn.Linear`` — its constructor arguments, forward inputs (``input=`` by
keyword, as torch passes it) and reference functions — with ``module_cls`` set to each of the two classes.
``nn.Linear`` must pass everything (the harness is right); ``gemmbridge.torch.Linear`` too, except the double
backward, which it refuses by design, with an error that says so. Gradients are checked with torch's testing
``gradcheck``, which turns batched gradients on. The memory-format check is skipped for
``nn.Linear`` by its ``ModuleInfo`` and is not run here.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from functools import partial

import pytest

torch = pytest.importorskip("torch")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")  # needs expecttest

from torch.autograd.gradcheck import GradcheckError  # noqa: E402
from torch.testing._internal.common_utils import gradcheck, gradgradcheck  # noqa: E402  (batched grads checked)

# importing torch's test utilities freezes torch.backends' flags for the whole process (disable_global_flags): the
# rest of the suite sets them (TF32 tests), so they are thawed again
torch.backends.disable_global_flags.__globals__["__allow_nonbracketed_mutation_flag"] = True

import gemmbridge as gb  # noqa: E402
import gemmbridge.torch as gt  # noqa: E402

LINEAR_INFO = next(info for info in common_modules.module_db if info.module_cls is torch.nn.Linear)
CLASSES = {"nn.Linear": torch.nn.Linear, "gemmbridge.Linear": gt.Linear}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
assert set(LINEAR_INFO.dtypes) == set(DTYPES.values()) and not LINEAR_INFO.train_and_eval_differ


def module_inputs(cls: type, device: str, dtype: torch.dtype, requires_grad: bool) -> Iterator:
    """The ModuleInfo's inputs, each with its constructor bound to ``cls``."""
    info = copy.copy(LINEAR_INFO)
    info.module_cls = cls
    yield from info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad, training=True)


def build(cls: type, module_input, device: str, dtype: torch.dtype) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    return cls(*args, **kwargs).to(device).to(dtype).train(True)


def forward(module: torch.nn.Module, module_input):  # type: ignore[no-untyped-def]
    return module(*module_input.forward_input.args, **module_input.forward_input.kwargs)


def the_input(module_input) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """nn.Linear's one forward input, given by position or as ``input=``."""
    (x,) = (*module_input.forward_input.args, *module_input.forward_input.kwargs.values())
    return x


def call(module: torch.nn.Module, module_input, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``module`` on ``x`` passed as the ModuleInput passes its own input: by position or as ``input=``."""
    return module(input=x) if module_input.forward_input.kwargs else module(x)


def assert_parameters_are(module: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
    for name, p in module.named_parameters():
        assert p.device == torch.device(device) and p.dtype == dtype, (name, p.device, p.dtype)


@pytest.fixture(params=list(CLASSES))
def cls(request: pytest.FixtureRequest) -> type:
    return CLASSES[request.param]


@pytest.fixture(params=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return DTYPES[request.param]


def test_forward(cls, dtype):
    """The forward against the ModuleInfo's reference; then ``.float()`` / ``.double()`` and a forward again."""
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=False):
        module = build(cls, module_input, "cpu", dtype)
        torch.testing.assert_close(forward(module, module_input), module_input.reference_fn(
            module, *module_input.forward_input.args, **module_input.forward_input.kwargs))  # fmt: skip
        module.double() if dtype == torch.float64 else module.float()
        forward(module, module_input)
        assert_parameters_are(module, "cpu", dtype)


def test_factory_kwargs(cls, dtype):
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=False):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        assert_parameters_are(cls(*args, **kwargs, device="cpu", dtype=dtype), "cpu", dtype)


def test_repr(cls, dtype):
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=False):
        module = build(cls, module_input, "cpu", dtype)
        assert repr(module) == str(module) and "in_features" in repr(module)


def test_pickle(cls, dtype):
    """``torch.save`` / ``torch.load`` of the whole module gives the same output (``weights_only=False``: since
    torch 2.6 the default refuses any pickled module, ``nn.Linear`` too)."""
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=False):
        module = build(cls, module_input, "cpu", dtype)
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(loaded) is cls
        torch.testing.assert_close(forward(loaded, module_input), forward(module, module_input))


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values every other element of a tensor twice as wide."""
    out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    assert not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


def test_non_contiguous_tensors(cls, dtype):
    """Non-contiguous inputs and output gradients give the contiguous ones' outputs and gradients."""
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=True):
        module = build(cls, module_input, "cpu", dtype)
        x = the_input(module_input)
        y = call(module, module_input, x)
        dy = torch.randn_like(y)
        want = [y.detach(), *torch.autograd.grad(y, (x, *module.parameters()), dy)]
        for x2 in (x, non_contiguous(x)):
            for dy2 in (dy, non_contiguous(dy)):
                y2 = call(module, module_input, x2)
                got = [y2.detach(), *torch.autograd.grad(y2, (x2, *module.parameters()), dy2)]
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, atol=1e-4, rtol=1.3e-6)


def gradient_checks(cls: type, check) -> None:  # type: ignore[no-untyped-def]
    """``check`` (gradcheck or gradgradcheck) in float64 over the input and all parameters, then over the input
    and each parameter alone (the others frozen), as torch's module tests do."""
    for module_input in module_inputs(cls, "cpu", torch.float64, requires_grad=True):
        module = build(cls, module_input, "cpu", torch.float64)
        args, params = (the_input(module_input),), tuple(module.parameters())

        def run(*inputs: torch.Tensor, module: torch.nn.Module = module, module_input=module_input) -> torch.Tensor:  # type: ignore[no-untyped-def]
            return call(module, module_input, inputs[0])  # the parameters among ``inputs`` are the module's own

        assert check(run, args + params)
        for p in params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            assert check(run, args + params)
            p.requires_grad_(False)


def test_grad(cls):
    """gradcheck as torch's module tests run it, less the batched gradients (the next test)."""
    gradient_checks(cls, partial(gradcheck, check_batched_grad=False))


def test_batched_grad(cls):
    """gradcheck's batched gradients (``torch.func.vmap`` over the backward), on by default in torch's own module
    tests: ``nn.Linear`` passes; gemmbridge's ``Linear`` refuses them with a gemmbridge error that says so."""
    if cls is torch.nn.Linear:
        gradient_checks(cls, gradcheck)
        return
    with pytest.raises((GradcheckError, gb.OptionError)) as info:
        gradient_checks(cls, gradcheck)
    error = info.value
    refusal = error if isinstance(error, gb.OptionError) else error.__cause__ or error.__context__
    assert isinstance(refusal, gb.OptionError) and "torch.func transforms" in str(refusal)


def test_gradgrad(cls):
    """``nn.Linear`` passes gradgradcheck; gemmbridge's backward is not differentiable by design and says so."""
    if cls is torch.nn.Linear:
        gradient_checks(cls, gradgradcheck)
        return
    with pytest.raises(RuntimeError, match="double backward"):
        gradient_checks(cls, gradgradcheck)


def test_forward_does_not_read_the_training_flag(cls, dtype):
    """The ModuleInfo says train and eval do not differ: a forward without ``training`` must still run."""
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=False):
        module = build(cls, module_input, "cpu", dtype)
        delattr(module, "training")
        forward(module, module_input)


def test_construction_on_the_meta_device(cls, dtype):
    """Built under ``torch.device("meta")``, the parameters are meta tensors with the CPU ones' metadata."""
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=False):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        on_cpu = cls(*args, **kwargs)
        with torch.device("meta"):
            on_meta = cls(*args, **kwargs)
        for meta, cpu in zip(on_meta.parameters(), on_cpu.parameters()):
            assert meta.is_meta and (meta.shape, meta.dtype, meta.stride()) == (cpu.shape, cpu.dtype, cpu.stride())
            assert meta.requires_grad == cpu.requires_grad


# -- a GPU: moving between devices, and CPU against GPU ------------------------------------------------------


def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
def test_multiple_device_transfer(cls, dtype):
    needs_cuda()
    cpu_inputs = list(module_inputs(cls, "cpu", dtype, requires_grad=False))
    for module_input, cpu_input in zip(module_inputs(cls, "cuda", dtype, requires_grad=False), cpu_inputs):
        module = build(cls, module_input, "cuda", dtype)
        forward(module, module_input)
        assert_parameters_are(module, "cuda:0", dtype)
        module.cpu()
        forward(module, cpu_input)
        assert_parameters_are(module, "cpu", dtype)
        module.cuda()
        forward(module, module_input)
        assert_parameters_are(module, "cuda:0", dtype)


@pytest.mark.gpu
def test_cpu_gpu_parity(cls, dtype):
    """The same module on the CPU and the GPU: the same outputs and gradients (torch's tolerances; TF32 is off by
    default)."""
    needs_cuda()
    tolerance = {torch.float32: 5e-2, torch.float64: 4e-4}[dtype]
    for module_input in module_inputs(cls, "cpu", dtype, requires_grad=True):
        cpu = build(cls, module_input, "cpu", dtype)
        gpu = copy.deepcopy(cpu).cuda()
        x = the_input(module_input)
        x_gpu = x.detach().cuda().requires_grad_()
        y, y_gpu = call(cpu, module_input, x), call(gpu, module_input, x_gpu)
        torch.testing.assert_close(y_gpu.cpu(), y, atol=tolerance, rtol=0)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, *cpu.parameters()), dy)
        grads_gpu = torch.autograd.grad(y_gpu, (x_gpu, *gpu.parameters()), dy.cuda())
        for g, g_gpu in zip(grads, grads_gpu):
            torch.testing.assert_close(g_gpu.cpu(), g, atol=tolerance, rtol=0)
