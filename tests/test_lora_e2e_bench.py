"""The end-to-end LoRA benchmark (``benchmarks/lora_e2e.py``) and the host-cost one (``scripts/host_cost.py``) on
the CPU: the aten reference's gradients, the configuration matrix, the targets' arithmetic, the option checks, and
a quick run of each whose JSON is read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import argparse  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "scripts")]
import host_cost  # noqa: E402
import lora_e2e as e2e  # noqa: E402


@pytest.mark.parametrize("bias", [False, True])
def test_aten_lora_function_gradients_are_the_formulas(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: e2e.AtenLoRA.apply(*t, 1.5), (x, w, b0, a, b))
    y = e2e.AtenLoRA.apply(x, w, b0, a, b, 1.5)
    want = x @ w.T + 1.5 * (x @ a.T) @ b.T + (b0 if bias else 0)
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)


def peft_model(dropout: float, dtype: torch.dtype = torch.float64, fp32_adapters: bool = False) -> nn.Module:
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5, dtype=dtype))
    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["0"])
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=fp32_adapters)
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_()  # B = 0 would hide the LoRA path
    return model


def test_use_aten_computes_peft_s_function_and_refuses_what_it_cannot():
    model = peft_model(0.0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    want = model(x)
    want.sum().backward()
    want_grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    x.grad = None
    for p in model.parameters():
        p.grad = None
    assert e2e.use_aten(model) == ["base_model.model.0"]
    got = model(x)
    got.sum().backward()
    got_grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.allclose(got, want) and all(torch.allclose(g, h) for g, h in zip(got_grads, want_grads))
    with pytest.raises(ValueError, match="dropout 0.1"):
        e2e.use_aten(peft_model(0.1))
    with pytest.raises(ValueError, match="torch.float32, its weight torch.bfloat16"):
        e2e.use_aten(peft_model(0.0, torch.bfloat16, fp32_adapters=True))


def test_the_matrix_compiles_only_what_the_targets_name_and_aten_only_at_bf16_dropout_0():
    configs = e2e.matrix(e2e.CANDIDATES, e2e.ADAPTERS, [0.0, 0.05], e2e.MODES, compile_all=False)
    eager = [c for c in configs if c.mode == "eager"]
    assert len(eager) == 1 + 4 + 1 + 4 + 4  # floor; peft, bridge, apply_lora: 2 dtypes × 2 dropouts; aten once
    assert [c for c in eager if c.candidate == "aten"] == [e2e.Config("aten", "bf16", 0.0, "eager")]
    compiled = {(c.candidate, c.adapters, c.dropout) for c in configs if c.mode == "compile"}
    assert compiled == {("floor", None, None)} | {(c, "bf16", 0.0) for c in ("peft", "aten", "bridge", "apply_lora")}
    every = e2e.matrix(e2e.CANDIDATES, e2e.ADAPTERS, [0.0, 0.05], ["compile"], compile_all=True)
    assert len(every) == len(eager)


def test_adapter_keys_name_peft_s_and_apply_lora_s_adapters_alike():
    peft_name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert e2e.adapter_key(peft_name) == e2e.adapter_key("model.layers.0.self_attn.q_proj.lora_a")
    assert e2e.adapter_key("model.layers.0.mlp.up_proj.lora_b") == "model.layers.0.mlp.up_proj.B"
    with pytest.raises(ValueError):
        e2e.adapter_key("model.layers.0.mlp.up_proj.weight")


def test_the_round_order_is_rotated_so_each_round_starts_elsewhere():
    firsts = [e2e.rotated(list("abcdef"), i, 3)[0] for i in range(3)]
    assert firsts == ["a", "c", "e"]
    assert sorted(e2e.rotated(list("abcdef"), 2, 3)) == list("abcdef")


def row(candidate: str, adapters: str | None, dropout: float | None, ms: float, tokens: int = 4096,
        mode: str = "eager") -> dict:  # fmt: skip
    return {"tokens": tokens, "mode": mode, "candidate": candidate, "adapters": adapters, "dropout": dropout, "ms": ms}


def test_targets_compare_with_the_right_rows_and_say_met_or_not():
    rows = [row("floor", None, None, 10.0), row("aten", "bf16", 0.0, 12.0), row("peft", "bf16", 0.0, 20.0),
            row("peft", "bf16", 0.05, 20.0), row("bridge", "bf16", 0.0, 11.9), row("bridge", "bf16", 0.05, 17.2),
            row("floor", None, None, 50.0, 16384), row("apply_lora", "fp32", 0.0, 55.5, 16384)]  # fmt: skip
    assert e2e.ratios(rows[4], rows) == pytest.approx({"vs_floor": 1.19, "vs_peft": 0.595, "vs_aten": 11.9 / 12})
    assert e2e.ratios(rows[0], rows) == {"vs_floor": 1.0, "vs_peft": None, "vs_aten": None}
    got = {(t["tokens"], t["candidate"], t["dropout"], t["ratio"]): t["met"] for t in e2e.targets(rows)}
    assert got == {
        (4096, "bridge", 0.0, "vs_aten"): True,  # 11.9 ≤ 12
        (4096, "bridge", 0.0, "vs_peft"): True,  # 0.595 ≤ 0.85
        (4096, "bridge", 0.05, "vs_peft"): False,  # 0.86 > 0.85
        (4096, "bridge", 0.0, "vs_floor"): False,  # the goal: 1.19 > 1.15
        (16384, "apply_lora", 0.0, "vs_floor"): False,  # 1.11 > 1.10
    }


def test_options_are_checked():
    assert e2e.parse_tokens("4096") == (4, 1024) and e2e.parse_tokens("16384") == (8, 2048)
    assert e2e.parse_tokens("2x32") == (2, 32)
    with pytest.raises(argparse.ArgumentTypeError, match="give 4096 or 16384"):
        e2e.parse_tokens("1000")
    assert e2e.names(e2e.CANDIDATES)("floor,aten") == ["floor", "aten"]
    with pytest.raises(argparse.ArgumentTypeError, match="nope: choose from floor"):
        e2e.names(e2e.CANDIDATES)("floor,nope")


def test_merge_joins_one_card_s_runs_and_refuses_two_cards(tmp_path):
    one = {"card": "H", "date": "d1", "config": {}, "versions": {}, "rows": [row("floor", None, None, 10.0)]}
    two = {**one, "date": "d2", "rows": [row("bridge", "fp32", 0.0, 10.5)]}
    paths = []
    for i, doc in enumerate((one, two, {**two, "card": "other"})):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(doc))
    merged = e2e.merge([str(p) for p in paths[:2]])
    assert [r["candidate"] for r in merged["rows"]] == ["floor", "bridge"]
    assert [(t["adapters"], t["ratio"], t["met"]) for t in merged["targets"]] == [("fp32", "vs_floor", True)]
    with pytest.raises(SystemExit, match="different cards"):
        e2e.merge([str(p) for p in paths])


def test_a_candidate_that_fails_is_reported_and_the_others_still_run(monkeypatch):
    import transformers

    size = {k: v for k, v in e2e.SIZES["small"].items() if k not in ("batch", "length", "steps")}
    config = transformers.LlamaConfig(num_key_value_heads=size["num_attention_heads"], use_cache=False, **size)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    ids = torch.randint(0, size["vocab_size"], (2, 16))

    def broken(model: nn.Module) -> None:
        raise RuntimeError("the bridge broke\nsecond line")

    monkeypatch.setattr(e2e, "use_gemmbridge", broken)
    configs = [e2e.Config("floor", None, None, "eager"), e2e.Config("bridge", "bf16", 0.0, "eager"),
               e2e.Config("apply_lora", "bf16", 0.0, "eager")]  # fmt: skip
    runs, checks = e2e.build_all(base, configs, ids, "inductor")
    assert [r.config.candidate for r in runs] == ["floor", "apply_lora"]
    assert checks[configs[1]] == {"error": "RuntimeError: the bridge broke", "agrees": False}
    assert checks[configs[2]]["agrees"] is True and "loss" in checks[configs[0]]


def test_a_quick_run_times_every_candidate_eager_and_compiled(tmp_path):
    out = tmp_path / "e2e.json"
    args = [sys.executable, str(ROOT / "benchmarks" / "lora_e2e.py"), "--quick", "--rounds", "2", "--steps", "1",
            "--compile-backend", "aot_eager", "--json", str(out)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same function: every candidate's loss and adapter gradients agree" in done.stdout
    doc = json.loads(out.read_text())
    assert {"card", "date", "versions", "config", "method", "rows", "targets"} <= doc.keys()
    got = {(r["mode"], r["candidate"], r["adapters"], r["dropout"]) for r in doc["rows"]}
    want = {(c.mode, c.candidate, c.adapters, c.dropout)
            for c in e2e.matrix(e2e.CANDIDATES, e2e.ADAPTERS, [0.0, 0.05], e2e.MODES, False)}  # fmt: skip
    assert got == want and len(doc["rows"]) == 19
    for r in doc["rows"]:
        assert r["ms"] > 0 and r["steps"] == 2 and len(r["rounds_ms"]) == 2 and r["spread_pct"] >= 0
        assert r["check"].get("agrees", True) is True
        assert r["peak_mib"] is None and r["tokens"] == 64 and r["mode"] in e2e.MODES
        if r["mode"] == "compile":
            assert r["check"]["graphs"] >= 1
    losses = {r["check"]["loss"] for r in doc["rows"] if r["candidate"] != "floor"}
    floor_loss = next(r["check"]["loss"] for r in doc["rows"] if r["candidate"] == "floor")
    assert floor_loss not in losses  # the adapters' B is not zero: the LoRA path changes the loss


def test_host_cost_runs_on_the_cpu_and_skips_the_cuda_rows(tmp_path):
    out = tmp_path / "host.json"
    args = [sys.executable, str(ROOT / "scripts" / "host_cost.py"), "--t", "8", "--d", "32", "--r", "4",
            "--rounds", "2", "--sample-ms", "1", "--compiled", "grad", "--compile-backend", "aot_eager",
            "--json", str(out)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["group"], r["name"]): r for r in doc["rows"]}
    assert rows["matmul bf16 1024³", "gb.matmul"]["skipped"] == "CUDA only"
    timed = {key for key, r in rows.items() if "us_median" in r}
    assert ("matmul fp32 64³", "gb.matmul") in timed and ("matmul fp32 64³", "torch.matmul") in timed
    steps = {name for group, name in timed if group == "LoRA step T=8"}
    assert steps == {"frozen nn.Linear", "PEFT LoRA Linear, bf16 adapters", "aten LoRA Function",
                     "gemmbridge LoRALinear"}  # fmt: skip
    assert {name for group, name in timed if group == "compiled, x requires grad"} >= {"F.linear"}
    lane = [r for (group, name), r in rows.items() if name == "lane GEMM"]
    assert len(lane) == 3 and all("us_median" in r or "lane" in r["skipped"] for r in lane)
    assert all(len(r["us_rounds"]) == 2 and r["us_best"] <= r["us_median"] for key, r in rows.items() if key in timed)
    assert any(t["group"] == "matmul fp32 64³" and t["row"] == "gb.matmul" for t in doc["targets"])


def test_host_targets_compare_medians_as_ratios_or_microseconds_over():
    def timed(group: str, name: str, us: float) -> host_cost.Row:
        return host_cost.Row(group, name, samples=[us], calls=1)

    rows = [timed("matmul fp32 64³", "torch.matmul", 10.0), timed("matmul fp32 64³", "gb.matmul", 7.9),
            timed("compiled, no_grad", "F.linear", 30.0), timed("compiled, no_grad", "gemmbridge linear", 35.5),
            host_cost.Row("compiled, no_grad", "gemmbridge mlp", skipped="why")]  # fmt: skip
    table, found = host_cost.summarize(rows)
    assert table[-1] == {"group": "compiled, no_grad", "name": "gemmbridge mlp", "skipped": "why"}
    got = [(t["row"], round(t["value"], 3), t["met"]) for t in found]
    assert got == [("gb.matmul", 0.79, True), ("gemmbridge linear", 5.5, False)]
