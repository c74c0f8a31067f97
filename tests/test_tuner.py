"""``gemmbridge.tune`` / ``tune_model`` and ``gemmbridge tune`` on a machine without a GPU: the arguments, the
layers found in a model, the exploring session's switches, and the one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemmbridge import tuner, tuning
from gemmbridge.errors import OptionError, VendorError

torch = pytest.importorskip("torch")
NO_GPU = not torch.cuda.is_available()


def run_cli(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """``gemmbridge tune ARGS`` in a fresh process (from ``cwd``, with this gemmbridge first on the path)."""
    import os

    import gemmbridge

    source = os.path.dirname(os.path.dirname(os.path.abspath(gemmbridge.__file__)))
    path = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "gemmbridge.cli", "tune", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": path, **(env or {})}, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --shapes MxNxK[,...] or --model"),
        (("--shapes", "64x64x64", "--model", "m:f", "--tokens", "8"), "give --shapes"),
        (("--shapes", "12x"), "is not MxNxK"),
        (("--shapes", "64x64x64", "--dtype", "int8"), "--dtype 'int8'"),
        (("--shapes", "64x64x64", "--tokens", "8"), "--tokens 8"),
        (("--shapes", "64x64x64", "--budget", "0"), "--budget 0"),
        (("--model", "m:f"), "--model needs --tokens"),
        (("--model", "m:f", "--tokens", "0"), "--tokens 0"),
        (("--model", "nofunc", "--tokens", "8"), "is not module:callable"),
        (("--model", "no_such_module_xyz:f", "--tokens", "8"), "cannot import no_such_module_xyz"),
        (("--model", "tiny_model:missing", "--tokens", "8"), "has no missing"),
        (("--model", "tiny_model:NOT_CALLABLE", "--tokens", "8"), "is not callable"),
        (("--model", "tiny_model:not_a_module", "--tokens", "8"), "returned a dict, not a torch.nn.Module"),
        (("--shapes", "64x64x64", "--json", "/no/such/dir/r.json"), "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message) -> None:
    (tmp_path / "tiny_model.py").write_text(
        "import torch\nNOT_CALLABLE = 3\n\ndef not_a_module():\n    return {}\n\n"
        "def build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))\n"
    )
    result = run_cli(*args, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("gemmbridge tune: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not NO_GPU, reason="the refusal of a machine without a GPU")
def test_without_a_gpu_tune_says_so_in_one_line(tmp_path) -> None:
    (tmp_path / "tiny_model.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(8, 16)\n")
    for args in (("--shapes", "64x64x64"), ("--model", "tiny_model:build", "--tokens", "8")):
        result = run_cli(*args, cwd=str(tmp_path))
        assert result.returncode == 2 and result.stderr == "gemmbridge tune: tuning needs an NVIDIA GPU, and torch " \
            "sees none\n", result.stderr  # fmt: skip
    with pytest.raises(tuner.BackendUnavailableError, match="NVIDIA GPU"):
        tuner.tune(["64x64x64"])


def test_tune_refuses_when_the_cache_is_off() -> None:
    result = run_cli("--shapes", "64x64x64", env={"GEMMBRIDGE_TUNING_CACHE": "0"})
    assert result.returncode == 2 and "tuning cache is off" in result.stderr


def test_help_names_the_options_and_the_cache() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("--shapes", "--model", "--tokens", "--transpose-b", "--budget", "GEMMBRIDGE_CACHE_DIR"):
        assert word in result.stdout


def test_the_layers_of_a_model_are_found_once_each_with_their_activation_and_dtype() -> None:
    from torch import nn

    import gemmbridge.torch as gt

    model = nn.Sequential(nn.Linear(8, 16), gt.Linear(16, 8, activation="gelu"), nn.Linear(8, 16),
                          nn.Linear(8, 4, bias=False), gt.MLP(8, 32, activation="relu"))  # fmt: skip
    assert tuner._layers(model, None) == [
        ("linear", (8, 16), True, "none", torch.float32),
        ("linear", (16, 8), True, "gelu", torch.float32),
        ("linear", (8, 4), False, "none", torch.float32),
        ("mlp", (8, 32, 8), True, "relu", torch.float32),
    ]
    assert {spec[-1] for spec in tuner._layers(model, torch.bfloat16)} == {torch.bfloat16}


def test_tune_model_refuses_bad_arguments_before_any_work() -> None:
    with pytest.raises(OptionError, match="tokens must be a positive int"):
        tuner.tune_model(torch.nn.Linear(2, 2), tokens=0)
    with pytest.raises(OptionError, match="dtype 'int4'"):
        tuner._dtype("int4")


def test_the_exploring_session_switches_on_and_back(monkeypatch) -> None:
    pytest.importorskip("nvmath.bindings.cublasLt")
    from gemmbridge.backends.cuda import autotune, explore

    monkeypatch.setattr(tuning, "enabled", True)
    before = (autotune.exploring, explore.budget_s, autotune.on_tuned)
    with tuner._exploring(1.5) as found:
        assert autotune.exploring and explore.budget_s == 1.5 and autotune.on_tuned is not None
        autotune.on_tuned("p", autotune.Tuned(autotune.Candidate("x", {"backend": "k"}, print), 2.0, 1.0, "explore",
                                              {"x": 1.0}), lambda: None)  # fmt: skip
    assert (autotune.exploring, explore.budget_s, autotune.on_tuned) == before
    assert [r for r, _ in found] == [tuner.TuneResult("p", 2.0, 1.0, "x", 1)] and found[0][0].speedup == 2.0
    with pytest.raises(OptionError, match="budget_s"), tuner._exploring(0.0):
        pass
    monkeypatch.setattr(tuning, "enabled", False)
    with pytest.raises(OptionError, match="tuning cache is off"), tuner._exploring(1.0):
        pass


def test_a_wrong_tuned_result_forgets_its_entries_and_raises() -> None:
    forgotten: list[int] = []
    found = [(tuner.TuneResult(f"p{i}", 1.0, 1.0, "x", 1), lambda i=i: forgotten.append(i)) for i in range(3)]
    assert tuner._checked(found, 1, "what", {"y": 1e-3}, 1e-2) == [found[1][0], found[2][0]]
    assert forgotten == []
    with pytest.raises(VendorError, match="dx rel err 5.0e-01"):
        tuner._checked(found, 1, "what", {"y": 1e-3, "dx": 0.5}, 1e-2)
    assert forgotten == [1, 2]
    with pytest.raises(VendorError):
        tuner._checked(found, 2, "what", {"y": float("nan")}, 1e-2)


@pytest.mark.parametrize("api", ["legacy", "fp32_precision", "global fp32_precision"])
def test_tf32_follows_the_dtype_asked_and_comes_back_whichever_api_set_it(api, tf32_start) -> None:
    """tune_model sets torch's TF32 setting for fp32/tf32 and restores it. Once torch's new API was used, reading the
    legacy flag raises ("mix of the legacy and new APIs"): tune_model crashed there. torch's CPU build has the same
    flags."""
    from gemmbridge.arrays.torch import tf32_policy

    matmul = torch.backends.cuda.matmul
    for start in (False, True):
        tf32_start(api, start)
        before = matmul.fp32_precision
        for label, inside in (("tf32", True), ("fp32", False), ("bf16", start)):
            with tuner._tf32(torch, tuner._dtype(label)):
                assert tf32_policy() is inside
            assert tf32_policy() is start and matmul.fp32_precision == before
        with tuner._tf32(torch, None):
            assert tf32_policy() is start


def test_the_command_prints_first_pick_against_tuned_and_writes_json(monkeypatch, tmp_path, capsys) -> None:
    """The table and the JSON of ``gemmbridge tune``, with the GPU work replaced by fixed results."""
    import json

    from gemmbridge import cli

    calls: list = []
    done = [tuner.TuneResult("bfloat16 m=4096 n=4096 k=4096", 0.2, 0.18, "id 66 tile 128x256", 120)]
    monkeypatch.setattr(tuner, "_torch_cuda", lambda: torch)
    monkeypatch.setattr(tuner, "tune", lambda shapes, **kw: calls.append((shapes, kw)) or done)
    monkeypatch.setattr(tuning, "enabled", True)
    out = tmp_path / "t.json"
    argv = ["tune", "--shapes", "4096x4096x4096", "--shapes", "1x2x3", "--dtype", "bf16,fp16", "--transpose-b"]
    assert cli.main([*argv, "--budget", "2", "--no-progress", "--json", str(out)]) == 0
    assert [str(s) for s in calls[0][0]] == ["4096x4096x4096", "1x2x3"] and len(calls) == 2
    assert [kw["dtype"].label for _, kw in calls] == ["bf16", "fp16"]
    assert calls[0][1] == {**calls[0][1], "transpose_a": False, "transpose_b": True, "budget_s": 2.0, "progress": False}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["problem", "first", "pick", "tuned", "speedup", "choice"]
    assert "0.2000 ms   0.1800 ms   1.111×  id 66 tile 128x256" in lines[1]
    doc = json.loads(out.read_text())
    assert doc["results"][0]["speedup"] == pytest.approx(0.2 / 0.18) and len(doc["results"]) == 2
