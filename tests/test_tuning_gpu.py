"""Tuning on a real GPU: ``gemmbridge.tune`` and ``tune_model`` explore cuBLASLt's algorithms, keep the choices in
the tuning cache, and a fresh process computes correctly with them (results against float64, outputs poisoned)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import gemmbridge as gb  # noqa: E402
from gemmbridge import tuning  # noqa: E402

pytestmark = pytest.mark.gpu

FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch
    import gemmbridge as gb
    dtype, transpose_b, (m, n, k) = getattr(torch, sys.argv[1]), sys.argv[2] == "1", map(int, sys.argv[3:6])
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, k, device="cuda", dtype=dtype) if transpose_b else torch.randn(k, n, device="cuda", dtype=dtype)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    gb.matmul(a, b, transpose_b=transpose_b, out=out, allow_tf32=False)
    ref = a.double() @ (b.double().T if transpose_b else b.double())
    (plan,) = gb.plan.PLANS.plans.values()
    ((lt, _, _),) = plan.state.plans.values()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(json.dumps({"rel_err": err, "choice": lt.choice, "nan": bool(torch.isnan(out).any())}))
""")


@pytest.fixture
def cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_files", {})
    monkeypatch.setattr(tuning, "enabled", True)
    yield tmp_path
    gb.clear_cache()


def fresh_process(dtype: str, transpose_b: bool, shape: tuple[int, int, int], cache_dir: str, use: bool) -> dict:
    env = {**os.environ, "GEMMBRIDGE_CACHE_DIR": cache_dir, "GEMMBRIDGE_TUNING_CACHE": "1" if use else "0"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, dtype, "1" if transpose_b else "0", *map(str, shape)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("dtype", "tol"), [("bfloat16", 1e-2), ("float16", 1e-2), ("float32", 1e-5), ("float64", 1e-12)]
)
@pytest.mark.parametrize("transpose_b", [False, True])
def test_a_tuned_shape_is_used_and_correct_in_a_fresh_process(cache, dtype, tol, transpose_b) -> None:
    shape = (768, 512, 1024)
    label = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}[dtype]
    (result,) = gb.tune(["x".join(map(str, shape))], dtype=label, transpose_b=transpose_b, budget_s=1.0)
    assert result.first_ms > 0 and result.tuned_ms > 0 and result.candidates > 1
    assert result.tuned_ms <= result.first_ms  # the choice beats the first pick, or is it
    (path,) = [p for p in cache.glob("*.json")]
    (entry,) = json.loads(path.read_text())["entries"].values()
    assert entry["method"] == "explore" and entry["choice"]["backend"] == "cublaslt"
    found = fresh_process(dtype, transpose_b, shape, str(cache), use=True)
    assert found["choice"] == -1 and not found["nan"] and found["rel_err"] < tol, found  # the cached algorithm
    off = fresh_process(dtype, transpose_b, shape, str(cache), use=False)
    assert off["choice"] == 0 and off["rel_err"] < tol, off  # the cache turned off: the heuristic's first pick


def test_tune_model_tunes_forward_and_both_gradients_of_each_linear(cache) -> None:
    from torch import nn

    import gemmbridge.torch as gt

    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), gt.Linear(512, 256, activation="gelu"),
                          nn.Linear(256, 256, bias=False), gt.MLP(256, 512)).to(torch.bfloat16)  # fmt: skip
    results = gb.tune_model(model, tokens=384, budget_s=0.5)
    described = [r.problem for r in results]
    # per linear: forward, input gradient, weight gradient (4 linears); the MLP's 2 forward and 4 backward GEMMs
    # (those with a problem met before share its plan)
    assert 3 * 4 <= len(results) <= 3 * 4 + 6, described
    for epilogue in ("gelu_aux", "bgrad_a", "dgelu", "none"):
        assert any(f"epilogue={epilogue} " in d for d in described), (epilogue, described)
    assert any("m=384 n=512 k=256" in d for d in described)  # the first layer's forward
    (path,) = list(cache.glob("*.json"))
    assert 12 <= len(json.loads(path.read_text())["entries"]) <= len(results)
    gb.clear_cache()
    x = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer = gt.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    y = layer(x)  # a plan served by the cache
    ref = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_tune_refuses_without_the_cache(cache, monkeypatch) -> None:
    monkeypatch.setattr(tuning, "enabled", False)
    with pytest.raises(gb.OptionError, match="tuning cache is off"):
        gb.tune(["64x64x64"])
