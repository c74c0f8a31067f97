"""The PEFT bridge against PEFT itself, on a small random ``transformers`` Llama built from a config (no downloads)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import gemmbridge.torch as gt  # noqa: E402
from gemmbridge.torch.peft import undo_gemmbridge, use_gemmbridge  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype: torch.dtype = torch.float32, **lora: object) -> torch.nn.Module:
    """A 2-layer Llama with LoRA on every linear layer of its blocks; B random, so A's gradients are not zero."""
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = transformers.LlamaConfig(vocab_size=64, num_key_value_heads=2, max_position_embeddings=64, **sizes)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, **lora}
    model = peft.get_peft_model(model, peft.LoraConfig(**options))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_the_bridge_gives_peft_s_logits_and_gradients_and_keeps_its_state_dict():
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = use_gemmbridge(model)
    assert len(report.served) == 2 * len(TARGETS) and not report.skipped
    assert report.served[0] == "base_model.model.model.layers.0.self_attn.q_proj"
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    tokens = torch.randint(0, 64, (2, 12))
    logits, grads = loss_and_grads(model, tokens)
    ref_logits, ref_grads = loss_and_grads(ref, tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_bridge_really_runs_the_fused_op(monkeypatch):
    from gemmbridge.torch import peft as bridge

    calls = []
    monkeypatch.setattr(bridge, "lora_linear", lambda *args: calls.append(args) or gt.lora_linear(*args))
    model = tiny_llama()
    use_gemmbridge(model)
    model(input_ids=torch.randint(0, 64, (1, 5)))
    assert len(calls) == 2 * len(TARGETS)
    assert {args[5] for args in calls} == {2.0}  # scaling = alpha / r


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def test_bfloat16_model_with_peft_s_float32_adapters_against_float64(device):
    """PEFT keeps the adapters float32 and runs the LoRA path on a float32 copy of x; the bridge casts the adapters
    down instead, so its LoRA path rounds to bfloat16: against the float64 model its error is a small multiple of
    PEFT's (measured 0.7–2.9× on the CPU, both 1–6 %), and the adapters' gradients are float32. The bound is 4×
    PEFT's own error, whatever that is on the card (on an H200 PEFT's error on one adapter gradient was 7 % over
    2 × 12 tokens, where the gradient's sum over tokens cancels; 2 × 64 tokens here)."""
    ref = tiny_llama(torch.bfloat16).to(device)
    assert ref.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    model, exact = copy.deepcopy(ref), copy.deepcopy(ref).double()
    use_gemmbridge(model)
    tokens = torch.randint(0, 64, (2, 64), device=device)
    (logits, grads), (peft_logits, peft_grads), (logits64, grads64) = (
        loss_and_grads(m, tokens) for m in (model, ref, exact)
    )
    assert logits.dtype == torch.bfloat16
    assert rel(logits, logits64) < 4 * rel(peft_logits, logits64) < 0.1
    for name, grad in grads.items():
        ours, theirs = rel(grad, grads64[name]), rel(peft_grads[name], grads64[name])
        assert grad.dtype == torch.float32 and theirs < 0.2, name
        assert ours < max(4 * theirs, 1e-2), (name, ours, theirs)


def test_dropout_probability_comes_from_peft_and_eval_turns_it_off():
    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                                peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.3, target_modules=["0"]))  # fmt: skip
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    assert use_gemmbridge(model).served == ["base_model.model.0"]
    x = torch.randn(5, 16)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.7)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base_layer(x) + 3.0 * ((x * mask / 0.7) @ a.T) @ b.T
    torch.testing.assert_close(y, want)
    model.eval()
    torch.testing.assert_close(model(x), layer.base_layer(x) + 3.0 * (x @ a.T) @ b.T)


def test_disabled_merged_and_multiple_adapters_fall_back_to_peft():
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    use_gemmbridge(model)
    tokens = torch.randint(0, 64, (1, 8))
    with model.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(model(input_ids=tokens).logits, ref(input_ids=tokens).logits)
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=tokens).logits, ref(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(model(input_ids=tokens).logits, ref(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)
    for m in (model, ref):
        torch.manual_seed(1)  # the same random adapter in both
        m.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        m.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(model(input_ids=tokens).logits, ref(input_ids=tokens).logits)


def test_layers_it_cannot_serve_are_left_to_peft_and_listed():
    dora = tiny_llama(use_dora=True, target_modules=["q_proj", "v_proj"])
    report = use_gemmbridge(dora)
    assert not report.served and len(report.skipped) == 4
    assert all("LoRA variant" in why for why in report.skipped.values())
    mixed = tiny_llama(target_modules=["q_proj", "embed_tokens"])
    report = use_gemmbridge(mixed)
    assert report.served == [f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "not peft's LoRA Linear" in report.skipped["base_model.model.model.embed_tokens"]
    with_bias = tiny_llama(lora_bias=True, target_modules=["q_proj"])
    assert all("lora_bias" in why for why in use_gemmbridge(with_bias).skipped.values())


def test_undo_gives_peft_s_forward_back():
    model = tiny_llama(target_modules=["q_proj"])
    served = use_gemmbridge(model).served
    assert use_gemmbridge(model).served == served  # twice is once
    assert undo_gemmbridge(model) == served
    layer = model.get_submodule(served[0])
    assert "forward" not in vars(layer)
    assert undo_gemmbridge(model) == []


def test_a_bridged_peft_model_compiles_without_graph_breaks():
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))  # fmt: skip
    use_gemmbridge(model)
    x = torch.randn(3, 16, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = [str(node.target) for g in explained.graphs for node in g.graph.nodes if node.op == "call_function"]
    assert ops.count("autograd_function_apply") == 2, ops  # the two LoRA layers' Function, traced


def test_an_adapter_added_after_bridging_is_checked_when_it_runs():
    """A DoRA adapter added and made active after ``use_gemmbridge`` runs on PEFT's forward, not the fused op."""
    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 32)),
                                peft.LoraConfig(r=4, target_modules=["0"]))  # fmt: skip
    assert use_gemmbridge(model).served
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    model.set_adapter("dora")
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["dora"].weight.normal_()
        layer.lora_magnitude_vector["dora"].weight.mul_(3.0)
    model.eval()
    x = torch.randn(5, 64)
    torch.testing.assert_close(model(x), type(layer).forward(layer, x))


# -- pickling, checkpoints ---------------------------------------------------------------------------------


def small_peft_model() -> torch.nn.Module:
    """Two linear layers with LoRA on both, B random (so the adapters change the output)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def count_fused_calls(monkeypatch) -> list:  # type: ignore[no-untyped-def]
    from gemmbridge.torch import peft as bridge

    calls: list = []
    monkeypatch.setattr(bridge, "lora_linear", lambda *args: calls.append(args) or gt.lora_linear(*args))
    return calls


def test_a_bridged_model_survives_torch_save_load_and_deepcopy(monkeypatch):
    import io

    model = small_peft_model()
    served = use_gemmbridge(model).served
    x = torch.randn(3, 16)
    want = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (loaded, copy.deepcopy(model)):
        calls = count_fused_calls(monkeypatch)
        torch.testing.assert_close(copied(x), want)
        assert len(calls) == 2  # still bridged, on the copy's own weights
        assert calls[0][3] is copied.base_model.model[0].lora_A["default"].weight
        assert undo_gemmbridge(copied) == served


def test_save_adapters_of_a_peft_model_points_to_save_pretrained(tmp_path):
    pytest.importorskip("safetensors")
    model = small_peft_model()
    with pytest.raises(gt.lora.OptionError, match=r"PEFT model .*save_pretrained"):
        gt.save_adapters(model, tmp_path / "a.safetensors")
    with pytest.raises(gt.lora.OptionError, match=r"PEFT model .*load_adapter"):
        gt.load_adapters(model, tmp_path / "a.safetensors")


# -- hooks: the bridge never runs a layer while bypassing one ------------------------------------------------

HOOKS = {
    "forward_pre": lambda m, log: m.register_forward_pre_hook(lambda *a: log.append(1)),
    "forward": lambda m, log: m.register_forward_hook(lambda *a: log.append(1)),
    "forward_kwargs": lambda m, log: m.register_forward_hook(lambda *a: log.append(1), with_kwargs=True),
    "full_backward": lambda m, log: m.register_full_backward_hook(lambda *a: log.append(1)),
    "full_backward_pre": lambda m, log: m.register_full_backward_pre_hook(lambda *a: log.append(1)),
}


@pytest.mark.parametrize("part", ["base_layer", "lora_A", "lora_B", "lora_dropout"])
@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("when", ["before", "after"], ids=["hooked-then-bridged", "bridged-then-hooked"])
def test_hooks_on_the_layers_peft_calls_run_as_under_peft(monkeypatch, part, kind, when):
    """A hook on a module PEFT's forward calls (the base layer, an adapter) fires as often bridged as under PEFT:
    a layer hooked when bridged is listed as skipped; a hook added later makes that call run PEFT's forward."""
    ref, model = small_peft_model(), small_peft_model()
    if when == "after":
        assert len(use_gemmbridge(model).served) == 2
    logs: dict = {"ref": [], "bridged": []}
    for key, m in (("ref", ref), ("bridged", model)):
        layer = m.base_model.model[0]
        hooked = getattr(layer, part) if part == "base_layer" else getattr(layer, part)["default"]
        handle = HOOKS[kind](hooked, logs[key])
    if when == "before":
        report = use_gemmbridge(model)
        assert report.served == ["base_model.model.2"]
        assert "hooks" in report.skipped["base_model.model.0"], report.skipped
    calls = count_fused_calls(monkeypatch)
    x = torch.randn(3, 16, requires_grad=True)
    for m in (ref, model):
        m(x).sum().backward()
    assert len(logs["bridged"]) == len(logs["ref"]) >= 1
    assert len(calls) == 1  # the other layer stays on the fused op
    torch.testing.assert_close(model(x), ref(x))
    handle.remove()
    calls.clear()
    model(x)
    assert len(calls) == (2 if when == "after" else 1)  # hook gone: a bridged layer is fused again


def test_a_global_module_hook_makes_every_call_run_peft_s_forward(monkeypatch):
    model = small_peft_model()
    use_gemmbridge(model)
    calls, log = count_fused_calls(monkeypatch), []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: log.append(type(m).__name__))
    try:
        model(torch.randn(3, 16))
    finally:
        handle.remove()
    assert not calls and log.count("Linear") >= 6  # each LoRA layer, its base layer, lora_A and lora_B
    model(torch.randn(3, 16))
    assert len(calls) == 2


@pytest.mark.parametrize("order", ["offload-then-bridge", "bridge-then-offload"])
def test_accelerate_offload_hooks_are_honoured(monkeypatch, order):
    """accelerate's ``cpu_offload`` keeps the weights on the meta device and brings them in through a hook that
    replaces each module's ``forward``: the bridge leaves such layers to PEFT's forward, which calls it."""
    accelerate = pytest.importorskip("accelerate")
    model = small_peft_model()
    x = torch.randn(3, 16)
    want = model(x)
    if order == "bridge-then-offload":
        assert len(use_gemmbridge(model).served) == 2
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.base_model.model[0].base_layer.weight.device.type == "meta"
    if order == "offload-then-bridge":
        report = use_gemmbridge(model)
        assert not report.served and all("accelerate" in why for why in report.skipped.values()), report
    calls = count_fused_calls(monkeypatch)
    torch.testing.assert_close(model(x), want)
    assert not calls


def test_peft_s_input_dtype_casting_hooks_run(monkeypatch):
    """PEFT's own test of ``disable_input_dtype_casting``: a float16 model whose hooks cast each module's parameters
    to float32 before its forward and back after; bridged, it behaves exactly as under PEFT."""
    from peft.helpers import disable_input_dtype_casting

    def to_fp32(module, args):  # type: ignore[no-untyped-def]
        for p in module.parameters(recurse=False):
            p.data = p.data.float()

    def to_fp16(module, args, output):  # type: ignore[no-untyped-def]
        for p in module.parameters(recurse=False):
            p.data = p.data.half()

    model = small_peft_model().half()
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(to_fp32)
            module.register_forward_hook(to_fp16)
    report = use_gemmbridge(model)
    assert not report.served and len(report.skipped) == 2
    x = torch.randn(4, 16)
    with disable_input_dtype_casting(model, active=True):
        assert model(x).dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"expected m.*1 and m.*2 to have the same dtype"):
        model(x)
