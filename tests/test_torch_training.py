"""The PyTorch training layer: gradients, custom ops, modules, torch.compile, autocast — on the CPU and the GPU."""

from __future__ import annotations

import contextlib
import copy

import pytest

torch = pytest.importorskip("torch")

from torch_paths import on_path  # noqa: E402

import gemmbridge as gb  # noqa: E402
import gemmbridge.torch as gt  # noqa: E402

F = torch.nn.functional
ACT = {"none": lambda x: x, "relu": F.relu, "gelu": lambda x: F.gelu(x, approximate="tanh")}


def rand(*shape, device="cpu", dtype=torch.float64, grad=True):  # type: ignore[no-untyped-def]
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def eager_and_traced_paths(activation: str):  # type: ignore[no-untyped-def]
    linear = lambda x, w, b: gt.linear(x, w, b, activation)  # noqa: E731
    return {"eager": linear, "traced": on_path("traced", linear)}


# -- gradients in float64 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["eager", "traced"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_gradcheck(device, path, activation, with_bias):
    x, w = rand(2, 3, 5, device=device), rand(4, 5, device=device)
    b = rand(4, device=device) if with_bias else None
    fn = eager_and_traced_paths(activation)[path]
    assert torch.autograd.gradcheck(lambda *t: fn(t[0], t[1], t[2] if with_bias else None),
                                    (x, w, b if with_bias else rand(1, device=device)))  # fmt: skip


@pytest.mark.parametrize("path", ["eager", "traced"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_gradcheck(device, path, activation):
    x = rand(6, 5, device=device)
    w1, b1, w2, b2 = (
        rand(7, 5, device=device),
        rand(7, device=device),
        rand(3, 7, device=device),
        rand(3, device=device),
    )
    assert torch.autograd.gradcheck(on_path(path, lambda *t: gt.mlp(*t, activation)), (x, w1, b1, w2, b2))


MATMUL_CASES = [
    pytest.param((4, 5), (5, 3), {}, id="2d"),
    pytest.param((5, 4), (3, 5), {"transpose_a": True, "transpose_b": True}, id="both-transposed"),
    pytest.param((2, 4, 5), (5, 3), {"alpha": -0.5}, id="batch@2d-alpha"),
    pytest.param((4, 5), (2, 5, 3), {"bias": (3,)}, id="2d@batch-bias"),
    pytest.param((2, 1, 4, 5), (3, 5, 3), {"c": (3, 4, 3), "beta": 0.25}, id="broadcast-c"),
    pytest.param((5,), (5, 3), {"c": (3,)}, id="1d@2d"),
    pytest.param((4, 5), (5,), {}, id="2d@1d"),
    pytest.param((4, 5), (5, 3), {"epilogue": "gelu", "bias": (3,)}, id="gelu-2d"),
    pytest.param((2, 4, 5), (5, 3), {"epilogue": "gelu"}, id="gelu-batched"),
    pytest.param((4, 5), (5, 3), {"epilogue": "relu", "c": (4, 3)}, id="relu"),
]


@pytest.mark.parametrize("path", ["eager", "traced"])
@pytest.mark.parametrize("sa, sb, options", MATMUL_CASES)
def test_matmul_gradcheck(device, path, sa, sb, options):
    """gemmbridge.matmul on tensors that require grad is differentiable in a, b, c and bias."""
    extras = {k: rand(*v, device=device) for k, v in options.items() if k in ("c", "bias")}
    scalars = {k: v for k, v in options.items() if k not in extras}
    a, b = rand(*sa, device=device), rand(*sb, device=device)
    names = list(extras)

    def fn(a, b, *rest):  # type: ignore[no-untyped-def]
        return gt.matmul(a, b, **scalars, **dict(zip(names, rest)))

    fn = on_path(path, fn)

    assert fn(a, b, *extras.values()).grad_fn is not None
    assert torch.autograd.gradcheck(fn, (a, b, *extras.values()))


def test_only_the_inputs_that_require_grad_get_one(device):
    x, w, b = rand(3, 5, device=device), rand(4, 5, device=device, grad=False), rand(4, device=device, grad=False)
    gt.linear(x, w, b, "gelu").sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None
    x, w, b = rand(3, 5, device=device, grad=False), rand(4, 5, device=device), rand(4, device=device)
    gt.linear(x, w, b).sum().backward()
    assert x.grad is None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize(
    "shape, hidden, out",
    [
        ((4,), 3, 2),
        ((0, 4), 3, 2),
        ((2, 0, 4), 3, 2),
        ((1, 5, 4), 3, 2),
        ((5, 0), 3, 2),
        ((5, 4), 0, 2),
        ((5, 4), 3, 0),
    ],
    ids=["1-d", "no-rows", "empty-batch", "batch-of-one", "no-inputs", "no-hidden", "no-outputs"],
)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_layers_train_on_vectors_and_empty_sizes_as_nn_linear_does(device, shape, hidden, out, activation):
    """Values and gradients equal torch's, on the eager and the traced path."""
    x, w1, b1 = rand(*shape, device=device), rand(hidden, shape[-1], device=device), rand(hidden, device=device)
    layers = {"linear": ((x, w1, b1), lambda x, w, b: ACT[activation](F.linear(x, w, b)))}
    if activation != "none":
        layers["mlp"] = (
            (x, w1, b1, rand(out, hidden, device=device), rand(out, device=device)),
            lambda x, w1, b1, w2, b2: F.linear(ACT[activation](F.linear(x, w1, b1)), w2, b2),
        )
    for name, (args, reference) in layers.items():
        want = reference(*args)
        seed = torch.randn_like(want)
        expected = torch.autograd.grad(want, args, seed)
        for path in ("eager", "traced"):
            mine = on_path(path, getattr(gt, name))(*args, activation)
            torch.testing.assert_close(mine, want)
            got = on_path(path, torch.autograd.grad)(mine, args, seed)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_an_mlp_with_one_output_never_asks_for_a_derivative_epilogue_with_k_1(activation):
    """cuBLASLt's dgelu/drelu need K ≥ 2, and K of fc2's input gradient is the MLP's output width."""
    from gemmbridge.torch import functions

    x, w1, b1, w2, b2 = rand(5, 4), rand(6, 4), rand(6), rand(1, 6), rand(1)
    epilogues_asked = []
    gemm = functions.gemm

    def recording(*args):  # type: ignore[no-untyped-def]
        epilogues_asked.append(args[9])
        return gemm(*args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(functions, "gemm", recording)
        gt.mlp(x, w1, b1, w2, b2, activation).sum().backward()
    grads = (x.grad, w1.grad, b1.grad, w2.grad, b2.grad)
    assert not {f"d{activation}", f"d{activation}_bgrad"} & set(epilogues_asked)
    x2, w1_, b1_, w2_, b2_ = (t.detach().clone().requires_grad_() for t in (x, w1, b1, w2, b2))
    F.linear(ACT[activation](F.linear(x2, w1_, b1_)), w2_, b2_).sum().backward()
    for got, want in zip(grads, (x2.grad, w1_.grad, b1_.grad, w2_.grad, b2_.grad)):
        torch.testing.assert_close(got, want)


def test_double_backward_is_refused_clearly(device):
    x, w = rand(3, 5, device=device), rand(4, 5, device=device)
    y = gt.linear(x, w, None, "gelu").sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)


def test_no_grad_and_inference_mode_record_nothing(device):
    x, w, b = rand(3, 5, device=device), rand(4, 5, device=device), rand(4, device=device)
    with torch.no_grad():
        assert gt.linear(x, w, b, "gelu").grad_fn is None
        assert gb.matmul(x, w, transpose_b=True).grad_fn is None
    with torch.inference_mode():
        y = gt.linear(x, w, b, "relu")
        assert y.grad_fn is None and y.is_inference()


def test_outputs_in_place_and_training_epilogues_are_refused_with_grad(device):
    a, b = rand(3, 5, device=device), rand(5, 4, device=device)
    with pytest.raises(gb.OptionError, match="out given while inputs require grad"):
        gb.matmul(a, b, out=torch.empty(3, 4, dtype=torch.float64, device=device))
    with pytest.raises(gb.OptionError, match="epilogue 'gelu_aux' with inputs that require grad"):
        gb.matmul(a, b, epilogue="gelu_aux")
    with pytest.raises(gb.OptionError, match="a Plan is not differentiable"):
        gb.Plan(a, b).run(a, b)


# -- against nn.Linear and a plain-torch MLP ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_linear_matches_nn_linear(device, activation):
    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 8, device=device)
    mine = gt.Linear.from_linear(copy.deepcopy(ref), activation)
    x = torch.randn(3, 4, 16, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = mine(x), ACT[activation](ref(x2))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_matches_two_nn_linears(device, activation):
    torch.manual_seed(0)
    mlp = gt.MLP(16, 32, activation=activation, device=device)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref = copy.deepcopy(mlp)
    y = mlp(x)
    y_ref = ref.fc2(ACT[activation](ref.fc1(x2)))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for name, p in mlp.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-4, atol=1e-4)


def test_modules_keep_nn_linears_parameters_and_state_dict(device):
    ref = torch.nn.Linear(6, 3, device=device)
    mine = gt.Linear(6, 3, activation="relu", device=device)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    mine.load_state_dict(ref.state_dict())
    torch.testing.assert_close(mine.weight, ref.weight)
    assert "activation='relu'" in repr(mine) and "in_features=6" in repr(mine)
    mlp = gt.MLP(6, 12, device=device)
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    restored = gt.MLP(6, 12, device=device)
    restored.load_state_dict(mlp.state_dict())
    x = torch.randn(2, 6, device=device)
    torch.testing.assert_close(restored(x), mlp(x))


def test_convert_linears_by_name_pattern(device):
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    ).to(device)
    weights = [p.data_ptr() for p in model.parameters()]
    x = torch.randn(3, 4, device=device)
    before = model(x)
    assert gt.convert_linears(model, "2.*") == ["2.0", "2.1"]
    assert type(model[0]) is torch.nn.Linear and isinstance(model[2][1], gt.Linear)
    assert [p.data_ptr() for p in model.parameters()] == weights  # shared, not copied
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert gt.convert_linears(model) == ["0"]


def test_mixed_dtypes_without_autocast_are_refused(device):
    x = torch.randn(3, 4, device=device, dtype=torch.bfloat16)
    layer = gt.Linear(4, 2, device=device)  # float32 parameters
    with pytest.raises(gb.DTypeError, match="differ"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_as_f_linear_and_keeps_float32_weight_gradients(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bfloat16")
    torch.manual_seed(0)
    ref = torch.nn.Linear(32, 16, device=device)
    mine = gt.Linear.from_linear(copy.deepcopy(ref), "gelu")
    x = torch.randn(8, 32, device=device)
    with torch.autocast(device, dtype=dtype):
        y = mine(x)
        y_ref = F.gelu(ref(x), approximate="tanh")
    assert y.dtype == y_ref.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert mine.weight.grad.dtype == torch.float32 and mine.bias.grad.dtype == torch.float32
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=3e-2, atol=3e-2)


# -- custom ops and torch.compile ------------------------------------------------------------------------


def gemm_op_cases(device: str) -> dict:
    """gemmbridge::gemm over every epilogue kind the backward formulas use, and the shapes its fake must follow."""
    x, w = rand(6, 5, device=device, grad=False), rand(4, 5, device=device, grad=False)
    b, dy = rand(4, device=device, grad=False), rand(6, 4, device=device, grad=False)
    with torch.no_grad():
        aux = gb.matmul(x, w, transpose_b=True, bias=b, epilogue="gelu_aux")[1]
    return {
        "gelu_aux": (x, w, None, b, None, False, True, 1.0, 0.0, "gelu_aux", None),
        "relu_aux": (x, w, None, b, None, False, True, 1.0, 0.0, "relu_aux", None),
        "dgelu": (dy, w, None, None, aux, False, False, 1.0, 0.0, "dgelu", None),
        "bgrad_a": (dy, x, None, None, None, True, False, 1.0, 0.0, "bgrad_a", None),
        "c-alpha-beta": (x, w, torch.randn_like(dy), None, None, False, True, 1.5, 0.5, "none", None),
        "batched-a-gelu_aux": (x.view(2, 3, 5), w, None, b, None, False, True, 1.0, 0.0, "gelu_aux", None),
        "1-d-a": (x[0], w, None, None, None, False, True, 1.0, 0.0, "none", None),
        "half-to-float32": (
            x.bfloat16(),
            w.bfloat16(),
            None,
            b.float(),
            None,
            False,
            True,
            1.0,
            0.0,
            "none",
            torch.float32,
        ),  # fmt: skip
        "float32-allow_tf32": (x.float(), w.float(), None, None, None, False, True, 1.0, 0.0, "none", None, True),
    }


@pytest.mark.parametrize("case", list(gemm_op_cases("cpu")))
def test_gemm_op_passes_opcheck_and_its_fake_has_the_real_shapes(device, case):
    args = gemm_op_cases(device)[case]
    torch.library.opcheck(torch.ops.gemmbridge.gemm.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.gemmbridge.gemm(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
    real = torch.ops.gemmbridge.gemm(*args)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_gemm_op_refuses_inputs_that_require_grad_clearly():
    x, w = rand(3, 5), rand(4, 5, grad=False)
    with pytest.raises(gb.OptionError, match="gemmbridge::gemm is not differentiable"):
        torch.ops.gemmbridge.gemm(x, w, None, None, None, False, True, 1.0, 0.0, "none", None)
    with torch.no_grad():
        torch.ops.gemmbridge.gemm(x, w, None, None, None, False, True, 1.0, 0.0, "none", None)


class Block(torch.nn.Module):
    """A small transformer-style block: attention projections as gemmbridge Linears, a gemmbridge MLP."""

    def __init__(self, d: int = 32, device: str = "cpu") -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, device=device)
        self.qkv = gt.Linear(d, 3 * d, device=device)
        self.proj = gt.Linear(d, d, device=device)
        self.mlp = gt.MLP(d, 4 * d, device=device)

    def forward(self, x):  # type: ignore[no-untyped-def]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.mlp(self.norm(x))


class LoRABlock(torch.nn.Module):
    """A LoRA-adapted MLP block: two ``LoRALinear`` layers (B random, so every adapter gets a gradient)."""

    def __init__(self, d: int = 32, dropout: float = 0.0, device: str = "cpu") -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, device=device)
        self.up = gt.LoRALinear(d, 2 * d, r=4, alpha=8, dropout=dropout, device=device)
        self.down = gt.LoRALinear(2 * d, d, r=4, dropout=dropout, bias=False, device=device)
        for layer in (self.up, self.down):
            torch.nn.init.normal_(layer.lora_b, std=0.1)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return x + self.down(F.gelu(self.up(self.norm(x))))


BLOCKS = {
    "block": lambda device: Block(device=device),
    "lora": lambda device: LoRABlock(device=device),
    "lora-dropout": lambda device: LoRABlock(dropout=0.2, device=device),
}


@pytest.mark.parametrize("kind", BLOCKS)
def test_compile_fullgraph_has_no_graph_breaks_and_matches_eager(device, kind):
    torch.manual_seed(0)
    block = BLOCKS[kind](device)
    x = torch.randn(2, 8, 32, device=device, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    if kind == "lora-dropout":  # compiled and eager draw their dropout masks differently: values compared in eval
        block.eval()
    compiled = torch.compile(block, fullgraph=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = compiled(x), block(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
    block.zero_grad()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for name, p in block.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-4)


# -- GPU: every dtype, CUDA graphs, reduce-overhead --------------------------------------------------------

GPU_TOL = {"float32": 1e-5, "tf32": 3e-3, "float16": 1e-2, "bfloat16": 1e-2}


def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def rel(x, ref) -> float:  # type: ignore[no-untyped-def]
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "tf32", "float16", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_outputs_and_gradients_in_every_dtype(dtype, activation):
    """Against a float64 reference; tf32 through torch's own flag."""
    needs_cuda()
    torch.manual_seed(0)
    tdtype = torch.float32 if dtype == "tf32" else getattr(torch, dtype)
    mlp = gt.MLP(256, 512, activation=activation, device="cuda", dtype=tdtype)
    ref = copy.deepcopy(mlp).double()
    x = torch.randn(64, 256, device="cuda", dtype=tdtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        y = mlp(x)
        y.backward(torch.ones_like(y))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    y64 = ref.fc2(ACT[activation](ref.fc1(x64)))
    y64.backward(torch.ones_like(y64))
    # relu's derivative is a step: rounding flips the mask where the pre-activation is near 0 (measured 8.5e-3
    # for tf32 on an H200, every gradient right elsewhere), so its gradients get a wider bound
    grad_tol = GPU_TOL[dtype] * (4 if activation == "relu" else 1)
    assert y.dtype == tdtype and rel(y, y64) < GPU_TOL[dtype]
    assert rel(x.grad, x64.grad) < grad_tol
    for name, p in mlp.named_parameters():
        assert rel(p.grad, dict(ref.named_parameters())[name].grad) < grad_tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["block", "lora"])
def test_a_training_step_captured_in_a_cuda_graph_replays_right(kind):
    needs_cuda()
    torch.manual_seed(0)
    block = BLOCKS[kind]("cuda")
    static_x = torch.randn(2, 8, 32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graph asks
        for _ in range(3):
            block.zero_grad(set_to_none=False)
            block(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    block.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = block(static_x).sum()
        static_loss.backward()
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        block.zero_grad(set_to_none=False)
        graph.replay()
        eager = copy.deepcopy(block)
        eager.zero_grad()
        loss = eager(static_x).sum()
        loss.backward()
        torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-4)
        for (name, p), q in zip(block.named_parameters(), eager.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["block", "lora"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_matches_eager_over_training_steps(kind, mode):
    """CUDA graph trees around the custom ops give what eager gives (PyTorch issue 157363 reported otherwise)."""
    needs_cuda()
    torch.manual_seed(0)
    eager = BLOCKS[kind]("cuda")
    compiled_block = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_block, mode=mode, fullgraph=True)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (eager, compiled_block)]
    for step in range(6):
        x = torch.randn(4, 16, 32, device="cuda")
        losses = []
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5, msg=f"step {step}")


# -- compile in training and inference, outputs that are tensors of their own, what torch.func can do ---------

COMPILED = {
    "linear": lambda device: lambda x: gt.linear(x, W[device], B[device], "gelu"),
    "mlp": lambda device: gt.MLP(8, 16, device=device),
    "lora_linear": lambda device: gt.LoRALinear(8, 6, r=2, dropout=0.1, device=device),
    "Linear": lambda device: gt.Linear(8, 6, activation="relu", device=device),
    "convert_linears": lambda device: _converted(device),
    "apply_lora": lambda device: _lora_model(device),
    "gb.matmul": lambda device: lambda x: gb.matmul(x, W[device], transpose_b=True, bias=B[device], epilogue="gelu"),
}
W = {d: torch.randn(6, 8, device=d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()}
B = {d: torch.randn(6, device=d) for d in W}


def _converted(device: str) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).to(device)
    gt.convert_linears(model)
    return model


def _lora_model(device: str) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).to(device)
    gt.apply_lora(model, "*", r=2)
    return model


@pytest.mark.parametrize("mode", ["training", "no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", COMPILED)
def test_every_op_and_module_compiles_fullgraph_without_breaks_in_training_and_inference(device, kind, mode):
    """One graph, no break, eager's values — also under no_grad and inference_mode, where the forward alone runs."""
    torch.manual_seed(0)
    fn = COMPILED[kind](device)
    if isinstance(fn, torch.nn.Module):
        fn.eval()  # dropout off: compiled and eager draw different masks
    x = torch.randn(3, 8, device=device, requires_grad=mode == "training")
    context = {"training": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    torch._dynamo.reset()
    with context[mode]():
        explained = torch._dynamo.explain(fn)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        y = torch.compile(fn, fullgraph=True)(x)
        want = fn(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    if mode == "training":
        (g,) = torch.autograd.grad(y.sum(), x)
        (g_want,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear-1d", "lora", "mlp"])
def test_outputs_are_tensors_of_their_own_that_in_place_ops_may_modify(device, kind):
    """As after F.linear: an in-place op on the output (nn.ReLU(inplace=True), ``result += …``) records fine."""
    x = torch.randn(10, device=device, requires_grad=True) if kind == "linear-1d" else rand(2, 3, 10, device=device)
    if kind == "linear-1d":
        model = torch.nn.Sequential(gt.Linear(10, 20, device=device), torch.nn.ReLU(inplace=True))
        y = model(x)
    elif kind == "lora":
        w, a, lb = rand(4, 10, device=device, grad=False), rand(2, 10, device=device), rand(4, 2, device=device)
        y = gt.lora_linear(x, w, None, a, lb, 2.0)
        assert y._base is None
        y.add_(1)
    else:
        y = gt.MLP(10, 12, device=device, dtype=torch.float64)(x)
        y += 1
    assert y._base is None
    y.sum().backward()
    assert x.grad is not None


def test_autocast_leaves_float64_alone_as_f_linear_does(device):
    x, w, b = rand(4, 8, device=device), rand(3, 8, device=device), rand(3, device=device)
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        want = F.linear(x, w, b)
        got = {
            "linear": gt.linear(x, w, b),
            "mlp": gt.mlp(x, rand(5, 8, device=device), None, rand(3, 5, device=device), None, "relu"),
            "lora": gt.lora_linear(x, w, b, rand(2, 8, device=device), rand(3, 2, device=device)),
        }
    assert want.dtype == torch.float64
    for name, y in got.items():
        assert y.dtype == torch.float64, name
    torch.testing.assert_close(got["linear"], want)


def test_bad_operands_are_refused_with_gemmbridge_errors():
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(gb.ShapeError, match=r"weight \(2, 5, 4\)"):
        gt.linear(x, torch.randn(2, 5, 4))
    with pytest.raises(gb.ShapeError, match=r"bias \(3,\)"):
        gt.linear(x, w, torch.randn(3))
    with pytest.raises(gb.OperandTypeError, match="x is a numpy.ndarray, not a torch.Tensor"):
        gt.linear(x.numpy(), w)
    with pytest.raises(gb.OperandTypeError, match="a is a numpy.ndarray"):
        gt.matmul(x.numpy(), w)
    with pytest.raises(gb.OperandTypeError, match="x is a numpy.ndarray"):
        gt.lora_linear(x.numpy(), w, None, torch.randn(2, 5), torch.randn(4, 2))
    with pytest.raises(gb.OptionError, match="transpose_a needs a matrix, a is 1-D"):
        gt.matmul(torch.randn(5), torch.randn(1, 3), transpose_a=True)
    with pytest.raises(gb.OptionError, match="alpha"):
        gt.matmul(x, w.mT, alpha=10**400)
    with pytest.raises(gb.OptionError, match="dropout '0.1' is not in"):
        gt.lora_linear(x, w, None, torch.randn(2, 5), torch.randn(4, 2), dropout="0.1")
    with pytest.raises(gb.ShapeError, match=r"w2 \(3, 7\)"):
        gt.mlp(x, torch.randn(6, 5), None, torch.randn(3, 7), None)


def test_torch_func_transforms_are_refused_clearly():
    x, w, b = rand(3, 5, grad=False), rand(4, 5, grad=False), rand(4, grad=False)
    for transform in (torch.func.grad, torch.func.vmap, torch.func.jacrev):
        with pytest.raises(gb.OptionError, match="torch.func transforms"):
            transform(lambda w: gt.linear(x, w, b, "gelu").sum())(w)
    y = gt.linear(x, w.requires_grad_(), b)
    with pytest.raises(gb.OptionError, match="torch.func transforms"):
        torch.autograd.grad(y, w, torch.randn(2, *y.shape), is_grads_batched=True)


# -- what a review of the launch lane found ----------------------------------------------------------------------


def test_autocast_neither_rounds_a_float32_bias_gradient_nor_recasts_a_backward_run_inside_it():
    """The bias gradient of half activations is summed in float32; a backward run inside the autocast region gives
    the same gradients as one run after it (the lane's GEMMs are never cast again)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 32), torch.randn(16, 32, requires_grad=True), torch.randn(16, requires_grad=True)
    dy = torch.randn(64, 16)
    grads = []
    for inside in (False, True):
        w.grad = b.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gt.linear(x, w, b)
            if inside:
                y.backward(dy.bfloat16())
        if not inside:
            y.backward(dy.bfloat16())
        grads.append((w.grad.clone(), b.grad.clone()))
    want_b = dy.bfloat16().double().sum(0)
    assert ((grads[0][1].double() - want_b).norm() / want_b.norm()).item() < 1e-6
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=1e-6)


def test_compiled_gb_matmul_casts_nothing_under_autocast_and_serves_the_whole_contract_without_grad():
    a, b = torch.randn(6, 8), torch.randn(8, 5)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.compile(lambda a, b: gb.matmul(a, b), fullgraph=True)(a, b).dtype == torch.float32
    bias, out = torch.randn(5), torch.empty(6, 5)
    with torch.no_grad():
        want_d, want_aux = gb.matmul(a, b, bias=bias, epilogue="gelu_aux")
        d, aux = torch.compile(lambda a, b: gb.matmul(a, b, bias=bias, epilogue="gelu_aux"), fullgraph=True)(a, b)
        written = torch.compile(lambda a, b: gb.matmul(a, b, out=out), fullgraph=True)(a, b)
    torch.testing.assert_close(d, want_d)
    torch.testing.assert_close(aux, want_aux)
    assert written is out
    torch.testing.assert_close(out, a @ b)


def test_a_layout_seen_before_with_other_dtypes_is_checked_again():
    bf = torch.bfloat16
    x = torch.randn(4, 8, dtype=bf)
    gt.linear(x, torch.randn(3, 8, dtype=bf))
    with pytest.raises(gb.DTypeError, match="differ"):
        gt.linear(x, torch.randn(3, 8))


def test_beta_zero_ignores_c_on_the_traced_path_too(device):
    a, b = rand(2, 3, 4, device=device), rand(4, 5, device=device, grad=False)
    c = torch.full((2, 3, 5), float("nan"), dtype=torch.float64, device=device)
    for path in ("eager", "traced"):
        assert torch.isfinite(on_path(path, lambda a, b, c: gb.matmul(a, b, c=c, beta=0.0))(a, b, c)).all(), path


def test_options_are_checked_on_the_traced_path_too():
    a, b = rand(3, 4), rand(4, 5)
    with pytest.raises(gb.OptionError, match="transpose_b must be True or False"):
        on_path("traced", lambda a, b: gt.matmul(a, b, transpose_b="no"))(a, b)


def test_the_lanes_table_stays_bounded_and_whole_under_threads(monkeypatch):
    import threading

    from gemmbridge.torch import lane

    monkeypatch.setattr(lane, "MAX_LAUNCHERS", 4)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            for n in range(1, 40):
                x = torch.randn(n % 7 + i + 1, 3)
                lane.gemm(x, torch.randn(2, 3), None, None, None, False, True, 1.0, 0.0, "none", None)
        except Exception as error:  # reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and lane.resolved() <= 4


def test_the_lora_kernels_tables_are_emptied_under_the_lanes_lock(monkeypatch):
    """clear_cache / set_kernels on one thread while another keeps a layout (evicting the oldest of a full table,
    the lane's lock held): the LoRA kernels' tables are emptied only once the keeping is done."""
    import threading

    from gemmbridge.torch import lane, lora_kernels

    monkeypatch.setattr(lora_kernels, "_masked", {("layout",): "launcher"})
    emptied = threading.Thread(target=lora_kernels.clear)
    with lane._lock:  # a remember() in progress
        emptied.start()
        emptied.join(0.5)
        assert emptied.is_alive() and lora_kernels.resolved() == 1
    emptied.join()
    assert lora_kernels.resolved() == 0
