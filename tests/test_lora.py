"""LoRA: the fused op's values and gradients, LoRALinear, apply_lora and adapter checkpoints — CPU and GPU.

torch.compile, CUDA graph capture and reduce-overhead of a LoRA block run with the other layers' in
test_torch_training.py (``LoRABlock``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_paths import on_path  # noqa: E402

import gemmbridge as gb  # noqa: E402
import gemmbridge.torch as gt  # noqa: E402
from gemmbridge.torch import functions  # noqa: E402

F = torch.nn.functional


def rand(*shape, device="cpu", dtype=torch.float64, grad=True):  # type: ignore[no-untyped-def]
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def plain_lora(x, w, b, a, lb, scale, mask=None, keep=1.0):  # type: ignore[no-untyped-def]
    """The composite in torch ops, as PEFT computes it: base + s · B(A(dropout(x)))."""
    xd = x if mask is None else x * mask / keep
    return F.linear(x, w, b) + scale * F.linear(F.linear(xd, a), lb)


def lora_args(device, x_shape=(2, 3, 6), out=5, r=3, bias=True, frozen=True):  # type: ignore[no-untyped-def]
    x, w = rand(*x_shape, device=device), rand(out, x_shape[-1], device=device, grad=not frozen)
    b = rand(out, device=device) if bias else None
    return x, w, b, rand(r, x_shape[-1], device=device), rand(out, r, device=device)


def lora(x, w, b, a, lb, mask, keep):  # type: ignore[no-untyped-def]
    return gt.lora_linear(x, w, b, a, lb, 0.75, 1 - keep, dropout_mask=mask)


PATHS = {"eager": lora, "traced": on_path("traced", lora)}


# -- gradients in float64 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["eager", "traced"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["p0", "p0.25-fixed-mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("frozen", [True, False], ids=["W-frozen", "W-trained"])
def test_lora_linear_gradcheck(device, path, dropout, bias, frozen):
    x, w, b, a, lb = lora_args(device, bias=bias, frozen=frozen)
    mask = (torch.rand(x.shape, device=device) > dropout) if dropout else None
    fn = PATHS[path]
    inputs = (x, w, b if bias else rand(1, device=device), a, lb)
    assert torch.autograd.gradcheck(lambda x, w, b, a, lb: fn(x, w, b if bias else None, a, lb, mask, 1 - dropout),
                                    inputs)  # fmt: skip


@pytest.mark.parametrize("x_shape", [(7,), (4, 7), (2, 3, 7), (0, 7), (1, 5, 7)], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_values_and_gradients_equal_the_plain_torch_composite(device, x_shape, dropout):
    """The mask the op draws is torch's bernoulli with keep = 1 - p: the same seed draws it again here."""
    x, w, b, a, lb = lora_args(device, x_shape=x_shape, out=5, r=4)
    torch.manual_seed(1234)
    y = gt.lora_linear(x, w, b, a, lb, 0.5, dropout)
    mask = None
    if dropout:
        torch.manual_seed(1234)
        mask = torch.empty(x.shape, dtype=torch.bool, device=device).bernoulli_(1 - dropout)
    x2, b2, a2, lb2 = (t.detach().clone().requires_grad_() for t in (x, b, a, lb))
    want = plain_lora(x2, w, b2, a2, lb2, 0.5, mask, 1 - dropout)
    torch.testing.assert_close(y, want)
    seed = torch.randn_like(want)
    got = torch.autograd.grad(y, (x, b, a, lb), seed)
    expected = torch.autograd.grad(want, (x2, b2, a2, lb2), seed)
    for name, g, e in zip("x b a lb".split(), got, expected):
        torch.testing.assert_close(g, e, msg=name)


def test_eval_mode_and_no_grad_skip_dropout_and_record_nothing(device):
    x, w, b, a, lb = lora_args(device)
    want = plain_lora(x, w, b, a, lb, 2.0)
    torch.testing.assert_close(gt.lora_linear(x, w, b, a, lb, 2.0, 0.5, training=False), want)
    mask = torch.rand(x.shape, device=x.device) < 0.5  # a fixed mask is ignored outside training too
    torch.testing.assert_close(gt.lora_linear(x, w, b, a, lb, 2.0, 0.5, training=False, dropout_mask=mask), want)
    with torch.no_grad():
        y = gt.lora_linear(x, w, b, a, lb, 2.0, 0.0)
    assert y.grad_fn is None
    torch.testing.assert_close(y, want.detach())


def test_every_gemm_of_half_activations_with_float32_adapters_runs_in_the_half_type(monkeypatch):
    """x is never upcast to the adapters' float32: the adapters come down; dA, dB come out of the GEMM in float32."""
    calls = []
    gemm = functions.gemm

    def recording(a, b, *rest):  # type: ignore[no-untyped-def]
        calls.append((tuple(a.shape), a.dtype, tuple(b.shape), b.dtype, rest[8]))
        return gemm(a, b, *rest)

    monkeypatch.setattr(functions, "gemm", recording)
    bf = torch.bfloat16
    x = torch.randn(8, 16, dtype=bf, requires_grad=True)
    w, b = torch.randn(12, 16, dtype=bf), torch.randn(12, dtype=bf)
    a, lb = rand(4, 16, dtype=torch.float32), rand(12, 4, dtype=torch.float32)
    y = gt.lora_linear(x, w, b, a, lb, 0.5, 0.2)
    y.backward(torch.randn_like(y))
    assert y.dtype == bf and x.grad.dtype == bf and a.grad.dtype == lb.grad.dtype == torch.float32
    assert len(calls) == 3 + 5  # forward: xs, the LoRA term, the base GEMM; backward: dB, gs, dA, gs·A, dx
    assert all(a_dtype == b_dtype == bf for _, a_dtype, _, b_dtype, _ in calls), calls
    assert sorted(str(out_dtype) for *_, out_dtype in calls) == ["None"] * 6 + ["torch.float32"] * 2


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_activations_against_float64(device, adapter_dtype):
    torch.manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(64, 96, device=device, dtype=bf, requires_grad=True)
    w, b = torch.randn(80, 96, device=device, dtype=bf) / 10, torch.randn(80, device=device, dtype=bf)
    a = (torch.randn(8, 96, device=device) / 10).to(adapter_dtype).requires_grad_()
    lb = torch.randn(80, 8, device=device, dtype=adapter_dtype, requires_grad=True)
    mask = torch.rand(x.shape, device=device) > 0.1
    y = gt.lora_linear(x, w, b, a, lb, 2.0, 0.1, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, a, lb)]
    y64 = plain_lora(ref[0], w.double(), b.double(), ref[1], ref[2], 2.0, mask, 0.9)
    y64.backward(dy.double())
    assert a.grad.dtype == lb.grad.dtype == adapter_dtype
    for got, want in [(y, y64), (x.grad, ref[0].grad), (a.grad, ref[1].grad), (lb.grad, ref[2].grad)]:
        assert rel(got, want) < 1e-2


def test_autocast_casts_as_f_linear_and_keeps_float32_gradients():
    lin = gt.LoRALinear(16, 8, r=4)
    torch.nn.init.normal_(lin.lora_b)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.lora_a.grad.dtype == lin.lora_b.grad.dtype == torch.float32
    want = plain_lora(x.double(), lin.weight.double(), lin.bias.double(), lin.lora_a.double(), lin.lora_b.double(), 1)
    assert rel(y, want) < 1e-2


def test_bad_inputs_are_refused_naming_them():
    x, w, b, a, lb = lora_args("cpu")
    with pytest.raises(gb.ShapeError, match=r"lora_a \(3, 5\)"):
        gt.lora_linear(x, w, b, a[:, :5], lb)
    with pytest.raises(gb.ShapeError, match=r"lora_b \(5, 2\)"):
        gt.lora_linear(x, w, b, a, lb[:, :2])
    with pytest.raises(gb.OptionError, match="dropout 1.0 is not in"):
        gt.lora_linear(x, w, b, a, lb, dropout=1.0)
    with pytest.raises(gb.OptionError, match="dropout_mask is"):
        gt.lora_linear(x, w, b, a, lb, dropout=0.1, dropout_mask=torch.ones(x.shape))
    with pytest.raises(gb.DTypeError, match="differ"):
        gt.lora_linear(x.float(), w, b, a, lb)
    with pytest.raises(gb.OptionError, match="r 0 is not"):
        gt.LoRALinear(4, 4, r=0)


def test_double_backward_is_refused_clearly():
    x, w, b, a, lb = lora_args("cpu")
    y = gt.lora_linear(x, w, b, a, lb).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, a, create_graph=True)


# -- LoRALinear, apply_lora, adapter checkpoints -------------------------------------------------------------


def test_a_new_lora_linear_computes_the_frozen_layer_and_trains_only_its_adapters(device):
    base = torch.nn.Linear(12, 7, device=device)
    lin = gt.LoRALinear.from_linear(base, r=4, alpha=8)
    assert lin.weight is base.weight and not lin.weight.requires_grad and not lin.bias.requires_grad
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]
    x = torch.randn(3, 12, device=device)
    torch.testing.assert_close(lin(x), base(x))
    assert "r=4, alpha=8" in repr(lin) and lin.scale == 2.0
    lin(x).sum().backward()
    assert lin.lora_b.grad.abs().sum() > 0 and base.weight.grad is None


def test_merge_and_unmerge_round_trip(device):
    torch.manual_seed(0)
    lin = gt.LoRALinear(12, 7, r=3, alpha=6, dropout=0.3, device=device)
    torch.nn.init.normal_(lin.lora_b)
    lin.eval()
    x = torch.randn(5, 12, device=device)
    w0, y0 = lin.weight.detach().clone(), lin(x)
    lin.merge()
    assert lin.merged
    torch.testing.assert_close(lin.weight, w0 + 2.0 * lin.lora_b.detach() @ lin.lora_a.detach())
    torch.testing.assert_close(lin(x), y0)
    with pytest.raises(RuntimeError, match="merged already"):
        lin.merge()
    lin.unmerge()
    torch.testing.assert_close(lin.weight, w0)
    torch.testing.assert_close(lin(x), y0)
    with pytest.raises(RuntimeError, match="not merged"):
        lin.unmerge()


def test_merge_and_unmerge_compute_in_the_base_weight_s_precision():
    """A float64 frozen weight with float32 adapters: W ± s·B·A in float64, so a round trip with B = 0 is exact."""
    torch.manual_seed(0)
    lin = gt.LoRALinear(12, 7, r=3, alpha=6, dtype=torch.float64, adapter_dtype=torch.float32)
    w0 = lin.weight.detach().clone()
    lin.merge()
    lin.unmerge()
    assert torch.equal(lin.weight, w0)
    torch.nn.init.normal_(lin.lora_b)
    lin.merge()
    want = w0 + 2.0 * lin.lora_b.detach().double() @ lin.lora_a.detach().double()
    torch.testing.assert_close(lin.weight, want, rtol=1e-15, atol=1e-15)
    lin.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gt.LoRALinear(2, 2, r=True), "r True is not a positive integer"),
        (lambda: gt.LoRALinear(2, 2, r=2.0), "r 2.0 is not a positive integer"),
        (lambda: gt.LoRALinear(2, 2, r=1, dropout="0.1"), "dropout '0.1' is not a number"),
        (lambda: gt.LoRALinear(2, 2, r=1, dropout=float("nan")), "dropout nan is not a number in"),
        (lambda: gt.LoRALinear(2, 2, r=1, alpha=10**400), "alpha 1000.* is not a finite number"),
        (lambda: gt.LoRALinear(2, 2, r=1, alpha="2"), "alpha '2' is not a finite number"),
        (lambda: gt.LoRALinear(2, 2, r=1, adapter_dtype=torch.int64), "dtype torch.int64 is not a floating"),
        (lambda: gt.LoRALinear.from_linear(torch.nn.Linear(2, 2), r=0), "r 0 is not"),
        (lambda: gt.apply_lora(small_model(), 0, r=1), "apply_lora: pattern 0 is not a string"),
        (lambda: gt.apply_lora(small_model(), ["*.q", None], r=1), "apply_lora: pattern None is not a string"),
        (lambda: gt.apply_lora(small_model(), [], r=1), "apply_lora: no pattern given"),
        (lambda: gt.apply_lora(small_model(), "*.q", r=1, dropout=2), "apply_lora: dropout 2 is not"),
        (lambda: gt.convert_linears(small_model(), None), "convert_linears: pattern None is not a string"),
        (lambda: gt.convert_linears(small_model(), "*", activation="tanh"), "activation 'tanh' is not one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_options_are_refused_naming_them(call, match):
    with pytest.raises(gb.OptionError, match=match):
        call()


def test_apply_lora_with_a_bad_option_leaves_the_model_as_it_was():
    model = small_model()
    with pytest.raises(gb.OptionError, match="r -1"):
        gt.apply_lora(model, "*.q", r=-1)
    assert all(p.requires_grad for p in model.parameters())
    assert type(model["blocks"][0]["q"]) is torch.nn.Linear


def small_model(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "v": torch.nn.Linear(8, 8), "out": torch.nn.Linear(8, 4)})
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 8), "blocks": torch.nn.ModuleList([block])}).to(device)


def run(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    h = model["emb"](tokens)
    block = model["blocks"][0]
    return block["out"](block["q"](h) * block["v"](h))


def test_apply_lora_by_pattern_freezes_the_rest_and_shares_the_weights(device):
    model = small_model(device)
    weight = model["blocks"][0]["q"].weight
    assert gt.apply_lora(model, ["*.q", "*.v"], r=2, alpha=4, dropout=0.1, dtype=torch.float64) == [
        "blocks.0.q",
        "blocks.0.v",
    ]
    q = model["blocks"][0]["q"]
    assert isinstance(q, gt.LoRALinear) and q.weight is weight and q.lora_a.dtype == torch.float64
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["blocks.0.q.lora_a", "blocks.0.q.lora_b", "blocks.0.v.lora_a", "blocks.0.v.lora_b"]
    with pytest.raises(gb.OptionError, match="'\\*.k'"):
        gt.apply_lora(small_model(device), ["*.q", "*.k"], r=2)
    mixed = torch.nn.ModuleDict({"plain": gt.Linear(4, 4), "gelu": gt.Linear(4, 4, activation="gelu"),
                                 "attn": torch.nn.MultiheadAttention(4, 1)})  # fmt: skip
    assert gt.apply_lora(mixed, "*", r=2) == ["plain"]  # not an activation's input, nor MHA's out_proj


def test_adapters_save_and_load_round_trip(device, tmp_path):
    pytest.importorskip("safetensors")
    model = small_model(device)
    gt.apply_lora(model, "*.[qv]", r=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tokens = torch.randint(0, 10, (3, 5), device=device)
    for _ in range(2):
        opt.zero_grad()
        run(model, tokens).square().mean().backward()
        opt.step()
    path = tmp_path / "adapters.safetensors"
    names = gt.save_adapters(model, path)
    assert names == ["blocks.0.q.lora_a", "blocks.0.q.lora_b", "blocks.0.v.lora_a", "blocks.0.v.lora_b"]
    fresh = small_model(device)
    gt.apply_lora(fresh, "*.[qv]", r=2)
    assert not torch.allclose(run(fresh, tokens), run(model, tokens))
    assert gt.load_adapters(fresh, path) == names
    torch.testing.assert_close(run(fresh, tokens), run(model, tokens))
    wrong_rank = small_model(device)
    gt.apply_lora(wrong_rank, "*.[qv]", r=3)
    with pytest.raises(gb.ShapeError, match=r"blocks.0.q.lora_a is \(2, 8\)"):
        gt.load_adapters(wrong_rank, path)
    fewer = small_model(device)
    gt.apply_lora(fewer, "*.q", r=2)
    with pytest.raises(gb.OptionError, match="unexpected \\['blocks.0.v.lora_a'"):
        gt.load_adapters(fewer, path)
    fresh["blocks"][0]["q"].merge()
    with pytest.raises(gb.OptionError, match="blocks.0.q merged"):
        gt.load_adapters(fresh, path)


# -- torch.compile (a LoRA block against eager: test_torch_training.py) -----------------------------------


def test_compiled_training_dropout_keeps_the_expected_fraction():
    """Under compile the mask is torch's RNG traced into the graph: about 1 - p of the LoRA input survives."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 256), torch.randn(4, 256)
    a, lb = torch.ones(1, 256, requires_grad=True), torch.ones(4, 1)
    compiled = torch.compile(lambda x, a: gt.lora_linear(x, w, None, a, lb, 1.0, 0.25), fullgraph=True)
    y = compiled(torch.ones_like(x), a)
    kept = (y[:, 0] - (torch.ones_like(x) @ w.T)[:, 0]) * 0.75  # Σ of the kept ones per row
    assert 0.70 < kept.mean().item() / 256 < 0.80


# -- GPU: every dtype, CUDA graphs, reduce-overhead --------------------------------------------------------

GPU_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(x, ref) -> float:  # type: ignore[no-untyped-def]
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("adapters", ["same", "float32"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_outputs_and_gradients_against_float64(dtype, adapters, dropout):
    needs_cuda()
    torch.manual_seed(0)
    adapter_dtype = dtype if adapters == "same" else torch.float32
    x = torch.randn(4, 256, 512, device="cuda", dtype=dtype, requires_grad=True)
    w, b = torch.randn(384, 512, device="cuda", dtype=dtype) / 20, torch.randn(384, device="cuda", dtype=dtype)
    a = (torch.randn(16, 512, device="cuda") / 20).to(adapter_dtype).requires_grad_()
    lb = (torch.randn(384, 16, device="cuda") / 4).to(adapter_dtype).requires_grad_()
    mask = torch.rand(x.shape, device="cuda") > dropout if dropout else None
    y = gt.lora_linear(x, w, b, a, lb, 2.0, dropout, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, a, lb)]
    y64 = plain_lora(ref[0], w.double(), b.double(), ref[1], ref[2], 2.0, mask, 1 - dropout)
    y64.backward(dy.double())
    assert y.dtype == x.grad.dtype == dtype and a.grad.dtype == lb.grad.dtype == adapter_dtype
    for name, got, want in [("y", y, y64), ("dx", x.grad, ref[0].grad), ("dA", a.grad, ref[1].grad),
                            ("dB", lb.grad, ref[2].grad)]:  # fmt: skip
        assert rel(got, want) < GPU_TOL[dtype], name


@pytest.mark.gpu
@pytest.mark.parametrize("adapters", [torch.bfloat16, torch.float32], ids=["bf16-adapters", "fp32-adapters"])
def test_dropout_drawn_inside_the_kernels_equals_the_composite_with_that_mask(monkeypatch, adapters):
    """Half activations on the GPU take the seeded path: the mask the kernels draw (dropout.mask of the seed, the
    NumPy reference) and 1 / its exact keep rate give the plain composite's values and gradients."""
    needs_cuda()
    from gemmbridge.backends.cuda.kernels import dropout
    from gemmbridge.torch import lora_kernels

    torch.manual_seed(0)
    seeds = []

    def seed_for(x):  # type: ignore[no-untyped-def]
        seeds.append(torch.randint(-(2**62), 2**62, (1,), dtype=torch.int64, device=x.device))
        return seeds[-1]

    monkeypatch.setattr(lora_kernels, "seed_for", seed_for)
    bf = torch.bfloat16
    x = torch.randn(2, 96, 256, device="cuda", dtype=bf, requires_grad=True)
    w, b = torch.randn(192, 256, device="cuda", dtype=bf) / 16, torch.randn(192, device="cuda", dtype=bf)
    a = (torch.randn(16, 256, device="cuda") / 16).to(adapters).requires_grad_()
    lb = (torch.randn(192, 16, device="cuda") / 4).to(adapters).requires_grad_()
    y = gt.lora_linear(x, w, b, a, lb, 2.0, 0.25)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert len(seeds) == 1, "the seeded path was not taken"
    mask = torch.from_numpy(dropout.mask(int(seeds[0].item()), 192, 256, 0.75)).view(x.shape).cuda()
    ref = [t.detach().double().requires_grad_() for t in (x, a, lb)]
    y64 = plain_lora(ref[0], w.double(), b.double(), ref[1], ref[2], 2.0, mask, dropout.effective_keep(0.75))
    y64.backward(dy.double())
    assert a.grad.dtype == lb.grad.dtype == adapters
    for name, got, want in [("y", y, y64), ("dx", x.grad, ref[0].grad), ("dA", a.grad, ref[1].grad),
                            ("dB", lb.grad, ref[2].grad)]:  # fmt: skip
        assert rel(got, want) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["bernoulli-mask", "mask-inside-the-kernels"])
def test_dropout_draws_a_new_mask_in_every_cuda_graph_replay(dtype):
    """torch's CUDA RNG is graph-safe, for its bernoulli mask (float32) and for the seed the kernels draw the mask
    from (bf16): each replay draws a new mask (same shapes, new values)."""
    needs_cuda()
    x = torch.ones(64, 128, device="cuda", dtype=dtype)
    w = torch.zeros(8, 128, device="cuda", dtype=dtype)
    a, lb = torch.ones(8, 128, device="cuda", dtype=dtype), torch.ones(8, 8, device="cuda", dtype=dtype) / 8
    y = gt.lora_linear(x, w, None, a, lb, 1.0, 0.5)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gt.lora_linear(x, w, None, a, lb, 1.0, 0.5)
    graph.replay()
    first = y.clone()
    graph.replay()
    assert not torch.equal(first, y)
    assert 0.4 < (first[:, 0].float() / 2).mean().item() / 128 < 0.6  # kept values are scaled by 1 / keep = 2
