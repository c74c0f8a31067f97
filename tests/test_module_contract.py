"""Every gemmbridge module behaves as the torch module it replaces: pickling, state_dict, train/eval, hooks, ``.to``.

Each case is a pair (gemmbridge's, torch's) with the same parameters and the same module tree: ``Linear`` and
``nn.Linear``; ``MLP`` and two ``nn.Linear`` around a tanh GELU; ``LoRALinear`` and the LoRA composite in torch ops;
a ``convert_linears`` model and the model it came from; an ``apply_lora`` model and the model with the torch LoRA
composite in place of its linear layers; a bridged PEFT model and the PEFT model. Both sides of every check run the
same calls and are compared with each other, on the CPU.
"""

from __future__ import annotations

import copy
import inspect
import io
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

import gemmbridge.torch as gt  # noqa: E402

nn, F = torch.nn, torch.nn.functional


class TorchGeluLinear(nn.Linear):
    """``gt.Linear(activation="gelu")`` in torch ops."""

    def forward(self, input):  # type: ignore[no-untyped-def]
        return F.gelu(super().forward(input), approximate="tanh")


class TorchMLP(nn.Module):
    """``gt.MLP`` in torch ops: the same ``fc1`` and ``fc2``."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, input):  # type: ignore[no-untyped-def]
        return self.fc2(F.gelu(self.fc1(input), approximate="tanh"))


class TorchLoRALinear(nn.Module):
    """``gt.LoRALinear`` in torch ops, PEFT's composite: ``x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``, the same parameters."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        base = nn.Linear(d_in, d_out)
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(r, d_in)), nn.Parameter(torch.randn(d_out, r))
        self.scale, self.p = alpha / r, dropout

    def forward(self, input):  # type: ignore[no-untyped-def]
        lora = F.linear(F.linear(F.dropout(input, self.p, self.training), self.lora_a), self.lora_b)
        return F.linear(input, self.weight, self.bias) + self.scale * lora


def base_model() -> nn.Module:
    """A model of nn.Linear layers, nested, with a dropout (whose mode must follow the model's)."""
    torch.manual_seed(0)
    block = nn.ModuleDict({"q": nn.Linear(6, 6), "v": nn.Linear(6, 6)})
    return nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.1), nn.Sequential(block.q, nn.ReLU(), block.v, nn.Linear(6, 3)))


def lora_ref_model(ours: nn.Module) -> nn.Module:
    """``base_model()`` with TorchLoRALinear where ``ours`` (an apply_lora model) has LoRALinear, same parameters."""
    ref = base_model()
    for name, module in ours.named_modules():
        if isinstance(module, gt.LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, TorchLoRALinear(6, module.out_features, 2, 4.0, 0.2))
    ref.load_state_dict(ours.state_dict())
    return ref


def randomize_adapters(model: nn.Module) -> None:
    """B starts at zero; random adapters make the LoRA path count in every comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_a", "lora_b", "lora_A.default.weight", "lora_B.default.weight")):
                p.normal_()


def linear_pair():  # type: ignore[no-untyped-def]
    ours = gt.Linear(6, 3)
    ref = nn.Linear(6, 3)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def gelu_linear_pair():  # type: ignore[no-untyped-def]
    ours = gt.Linear(6, 3, activation="gelu")
    ref = TorchGeluLinear(6, 3)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def mlp_pair():  # type: ignore[no-untyped-def]
    ours = gt.MLP(6, 8, 3)
    ref = TorchMLP(6, 8, 3)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def lora_linear_pair():  # type: ignore[no-untyped-def]
    ours = gt.LoRALinear(6, 3, r=2, alpha=4.0, dropout=0.2)
    randomize_adapters(ours)
    ref = TorchLoRALinear(6, 3, 2, 4.0, 0.2)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def converted_pair():  # type: ignore[no-untyped-def]
    ref = base_model()
    ours = copy.deepcopy(ref)
    assert len(gt.convert_linears(ours)) == 4
    return ours, ref


def apply_lora_pair():  # type: ignore[no-untyped-def]
    ours = base_model()
    assert gt.apply_lora(ours, ["0", "2.*"], r=2, alpha=4.0, dropout=0.2) == ["0", "2.0", "2.2", "2.3"]
    randomize_adapters(ours)
    return ours, lora_ref_model(ours)


def bridged_pair():  # type: ignore[no-untyped-def]
    peft = pytest.importorskip("peft")
    from gemmbridge.torch.peft import use_gemmbridge

    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.2, target_modules=["0", "2.0", "2.2"])
    ref = peft.get_peft_model(base_model(), config)
    randomize_adapters(ref)
    ours = copy.deepcopy(ref)
    assert len(use_gemmbridge(ours).served) == 3
    return ours, ref


PAIRS: dict[str, Callable] = {
    "Linear": linear_pair,
    "Linear-gelu": gelu_linear_pair,
    "MLP": mlp_pair,
    "LoRALinear": lora_linear_pair,
    "convert_linears": converted_pair,
    "apply_lora": apply_lora_pair,
    "peft-bridge": bridged_pair,
}


@pytest.fixture(params=list(PAIRS))
def pair(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module]:
    return PAIRS[request.param]()


def inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 6, dtype=dtype, requires_grad=True)


def outputs_agree(ours: nn.Module, ref: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    """The same output and input gradient (in eval mode: no dropout mask to differ)."""
    ours.eval(), ref.eval()
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x2)
    assert y.dtype == y_ref.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=tol, atol=tol)


def test_outputs_and_gradients_agree(pair):
    outputs_agree(*pair, inputs())


def modes(model: nn.Module) -> list[tuple[str, bool]]:
    return [(name, m.training) for name, m in model.named_modules()]


def test_train_and_eval_propagate_as_in_the_torch_module(pair):
    ours, ref = pair
    assert [name for name, _ in modes(ours)] == [name for name, _ in modes(ref)]
    for switch in ("eval", "train", "eval"):
        getattr(ours, switch)(), getattr(ref, switch)()
        assert modes(ours) == modes(ref) and all(flag == (switch == "train") for _, flag in modes(ours))
    x = inputs()
    torch.testing.assert_close(ours(x), ours(x))  # eval: no dropout anywhere


def test_state_dict_round_trip(pair):
    ours, ref = pair
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[name], msg=name)
    fresh = copy.deepcopy(ours)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()  # nothing of the original's values left
    fresh.load_state_dict(ref.state_dict())
    outputs_agree(fresh, ref, inputs())
    ref.load_state_dict(ours.state_dict())  # and back


class CountCalls:
    """A picklable hook: counts its calls (a lambda would not survive ``torch.save``)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object) -> None:
        self.calls += 1


HOOK_DICTS = {"forward_pre": "_forward_pre_hooks", "forward": "_forward_hooks", "full_backward": "_backward_hooks"}


def add_counting_hooks(model: nn.Module) -> None:
    """A forward pre-hook, a forward hook and a full backward hook on every module."""
    for module in model.modules():
        for kind in HOOK_DICTS:
            getattr(module, f"register_{kind}_hook")(CountCalls())


def hook_calls(model: nn.Module) -> dict[str, int]:
    """How often each module's counting hooks fired, read from the module's own hook dictionaries."""
    return {
        f"{name}:{kind}": sum(hook.calls for hook in getattr(m, attr).values() if isinstance(hook, CountCalls))
        for name, m in model.named_modules()
        for kind, attr in HOOK_DICTS.items()
    }


def test_hooks_fire_as_on_the_torch_module(pair):
    ours, ref = pair
    add_counting_hooks(ours), add_counting_hooks(ref)
    outputs_agree(ours, ref, inputs())
    assert hook_calls(ours) == hook_calls(ref) and sum(hook_calls(ours).values()) >= 3


def test_torch_save_and_load_round_trip(pair):
    ours, ref = pair
    ours.eval()
    add_counting_hooks(ours), add_counting_hooks(ref)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in ours.modules()]
    assert modes(loaded) == modes(ours)
    outputs_agree(loaded, ref, inputs())
    assert hook_calls(loaded) == hook_calls(ref) and sum(hook_calls(loaded).values()) >= 3
    assert not any(hook_calls(ours).values())  # the original's hooks are the original's


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_dtype_converts_every_parameter_as_torch_does(pair, dtype):
    ours, ref = pair
    ours.to(dtype), ref.to(dtype)
    assert {p.dtype for p in ours.parameters()} == {p.dtype for p in ref.parameters()} == {dtype}
    outputs_agree(ours, ref, inputs(dtype), tol=1e-12 if dtype == torch.float64 else 2e-2)


# -- a drop-in takes the same arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, replaces",
    [
        (lambda: gt.Linear(6, 3), nn.Linear),
        (lambda: gt.MLP(6, 8, 3), nn.Sequential),
        (lambda: gt.LoRALinear(6, 3, r=2), nn.Linear),
    ],
    ids=["Linear", "MLP", "LoRALinear"],
)
def test_forward_takes_the_argument_names_of_the_module_it_replaces(make, replaces):
    module = make()
    assert list(inspect.signature(type(module).forward).parameters) == list(
        inspect.signature(replaces.forward).parameters
    )
    x = torch.randn(4, 6)
    torch.testing.assert_close(module(input=x), module(x))


# -- replacing layers keeps what the replaced ones carried ---------------------------------------------------

CONVERTERS = {
    "convert_linears": lambda model: gt.convert_linears(model),
    "apply_lora": lambda model: gt.apply_lora(model, "*", r=2, dropout=0.5),
}


@pytest.mark.parametrize("convert", CONVERTERS)
def test_a_model_in_eval_mode_stays_in_eval_mode(convert):
    """``nn.Module.__init__`` sets ``training``: a new layer would train (dropout on) inside an eval model."""
    model = base_model().eval()
    CONVERTERS[convert](model)
    assert not any(m.training for m in model.modules())
    x = torch.randn(16, 6)
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("convert", CONVERTERS)
def test_hooks_registered_before_the_conversion_keep_firing(convert):
    """Forward, forward pre-, backward and state-dict hooks on the replaced layers move to the new ones, and a handle
    taken before the conversion still removes its hook."""
    model = base_model()
    add_counting_hooks(model)
    handle = model[2][3].register_forward_hook(lambda m, i, o: o * 0)
    model[2][0].register_state_dict_post_hook(lambda m, sd, prefix, local: sd.update({prefix + "seen": 1}))
    CONVERTERS[convert](model)
    x = torch.randn(4, 6, requires_grad=True)
    y = model(x)
    assert not y.any()  # the zeroing hook moved to the new last layer
    y.sum().backward()
    assert set(hook_calls(model).values()) == {1}, hook_calls(model)
    assert "2.0.seen" in model.state_dict()
    handle.remove()
    assert model(x).all()


def test_an_mlp_runs_its_layers_when_apply_lora_replaced_them():
    """``apply_lora`` on a model with an ``MLP`` puts LoRA layers on its fc1 and fc2: the MLP must run them, not
    read their frozen weights past the adapters."""
    torch.manual_seed(0)
    model = nn.Sequential(gt.MLP(6, 8, 3))
    x = torch.randn(4, 6)
    frozen = model(x)
    assert gt.apply_lora(model, "0.fc*", r=2) == ["0.fc1", "0.fc2"]
    randomize_adapters(model)
    mlp = model[0]
    want = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    torch.testing.assert_close(model(x), want)
    assert not torch.allclose(model(x), frozen)
