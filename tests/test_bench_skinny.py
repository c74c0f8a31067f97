"""The skinny preset (LoRA's GEMMs in a layer's layouts, decode steps), its bandwidth figures and target, the
GPU-time view of small shapes, and ``benchmarks/skinny_gemms.py``.

CPU tests run everywhere; the ``gpu`` ones run the new paths (graph-replayed GPU µs, the skinny rows, the
script) on CUDA.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cuda_torch

import gemmbridge as gb
from gemmbridge.bench import presets, report
from gemmbridge.bench.data import DTYPES, make_inputs
from gemmbridge.bench.peaks import bandwidth_use
from gemmbridge.bench.presets import Shape, decode_steps, lora_roles, preset_shapes, skinny_shapes
from gemmbridge.bench.runner import BenchOptions, run

TINY = {"rep_ms": 1.0, "rounds": 1, "peak_size": 48, "progress": False}
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "skinny_gemms.py"
ROLES = ["x·Aᵀ", "xa·Bᵀ", "dy·B", "dyᵀ·xa", "dyBᵀ·x"]


def test_lora_roles_have_the_layouts_and_sizes_of_a_lora_layer():
    t, d, r = 4096, 4096, 16
    got = {s.role: (s.m, s.n, s.k, s.layout) for s in lora_roles(t, d, r)}
    assert got == {
        "x·Aᵀ": (t, r, d, "nt"),  # x (T, d) · A (r, d)ᵀ
        "xa·Bᵀ": (t, d, r, "nt"),  # xa (T, r) · B (d, r)ᵀ
        "dy·B": (t, r, d, "nn"),  # dy (T, d) · B (d, r)
        "dyᵀ·xa": (d, r, t, "tn"),  # dy (T, d)ᵀ · xa (T, r): dB
        "dyBᵀ·x": (r, d, t, "tn"),  # dyB (T, r)ᵀ · x (T, d): dA
    }
    decode = decode_steps((1, 16), ((14336, 4096),))
    assert [(s.m, s.n, s.k, s.layout, s.role) for s in decode] == [
        (1, 14336, 4096, "nt", "decode x·Wᵀ"), (16, 14336, 4096, "nt", "decode x·Wᵀ"),
    ]  # fmt: skip
    assert str(decode[0]) == "1x14336x4096:nt" and str(Shape(8, 8, 8)) == "8x8x8"


def test_the_skinny_preset_is_issue_10s_shapes_and_runs_only_when_named():
    shapes = preset_shapes("cuda", ["skinny"])
    lora = [s for s in shapes if s.role in ROLES]
    decode = [s for s in shapes if s.role == "decode x·Wᵀ"]
    assert len(lora) == 5 * 2 * 3 and len(decode) == 4 * 3 and len(shapes) == len(lora) + len(decode)
    down = [s for s in lora if s.role == "x·Aᵀ"]
    assert {s.m for s in down} == {4096, 16384} and {s.n for s in down} == {8, 16, 64} and {s.k for s in down} == {4096}
    assert {(s.n, s.k) for s in decode} == {(4096, 4096), (14336, 4096), (4096, 14336)}
    assert {s.m for s in decode} == {1, 4, 8, 16} and all(s.preset == "skinny" for s in shapes)
    assert "skinny" not in presets.DEFAULT_PRESETS
    for device in ("cpu", "cuda"):
        skinny = preset_shapes(device, ["skinny"])
        assert skinny == skinny_shapes(**presets.SKINNY[device]) and set(skinny) <= set(preset_shapes(device, ["all"]))


def test_a_run_without_presets_times_the_default_ones(monkeypatch):
    table = {name: [Shape(8, 8, 8 * (i + 1), preset=name)] for i, name in enumerate(presets.PRESETS["cpu"])}
    monkeypatch.setitem(presets.PRESETS, "cpu", table)
    doc = run(BenchOptions(device="cpu", candidates="gemmbridge,numpy", **TINY))
    assert doc["settings"]["presets"] == sorted(presets.DEFAULT_PRESETS)
    everything = run(BenchOptions(device="cpu", presets="all", candidates="gemmbridge,numpy", **TINY))
    assert everything["settings"]["presets"] == sorted(table)


def test_inputs_are_transposed_views_of_row_major_arrays_as_the_shape_says():
    rng = np.random.default_rng(0)
    a, b = make_inputs("cpu", Shape(6, 3, 5, transpose_a=True), DTYPES["fp32"], rng)
    assert a.shape == (6, 5) and a.T.flags.c_contiguous and not a.flags.c_contiguous
    assert b.shape == (5, 3) and b.flags.c_contiguous and np.all(a != 0) and np.all(b != 0)
    a, b = make_inputs("cpu", Shape(4, 7, 2, batch=3, transpose_b=True), DTYPES["fp32"], rng)
    assert b.shape == (3, 2, 7) and np.swapaxes(b, -1, -2).flags.c_contiguous and a.flags.c_contiguous


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("x·Aᵀ", 4096 * 4096 + 16 * 4096 + 4096 * 16),  # read x and A, write xa
        ("xa·Bᵀ", 4096 * 16 + 4096 * 16 + 4096 * 4096),  # read xa and B, write T×d
        ("dy·B", 4096 * 4096 + 4096 * 16 + 4096 * 16),  # read dy and B, write dyB
        ("dyᵀ·xa", 4096 * 4096 + 4096 * 16 + 4096 * 16),  # read dy and xa, write dB (d×r)
        ("dyBᵀ·x", 4096 * 16 + 4096 * 4096 + 16 * 4096),  # read dyB and x, write dA (r×d)
    ],
)
def test_bytes_moved_per_role_are_read_a_read_b_write_d(role, expected):
    (shape,) = [s for s in lora_roles(4096, 4096, 16) if s.role == role]
    assert shape.nbytes(2) == 2 * expected and shape.nbytes(4) == 4 * expected


def test_bandwidth_use_is_bytes_over_time_against_the_copy():
    use = bandwidth_use(nbytes=3_000_000_000, ms=1.0, copy_bytes_per_s=4e12)
    assert use["gb_per_s"] == pytest.approx(3000.0) and use["pct_of_copy"] == pytest.approx(75.0)
    assert bandwidth_use(10**6, 2.0, None) == {"gb_per_s": pytest.approx(0.5), "pct_of_copy": None}
    (decode,) = decode_steps((1,), ((14336, 4096),))  # 14336×4096 bf16 weight read once in 30 µs
    assert bandwidth_use(decode.nbytes(2), 0.030, 4.5e12)["pct_of_copy"] == pytest.approx(
        100 * 2 * (4096 + 14336 * 4096 + 14336) / 30e-6 / 4.5e12
    )


@pytest.fixture(scope="module")
def skinny_doc():
    small = [*lora_roles(64, 256, 8), *decode_steps((1, 4), ((384, 256),))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(presets.PRESETS["cpu"], "skinny", small)
        yield run(BenchOptions(device="cpu", presets="skinny", shapes=["16x16x16"], dtypes="fp32,bf16", **TINY))


def test_skinny_rows_report_percent_of_copy_and_the_target(skinny_doc):
    doc = skinny_doc
    report.validate(doc)
    bandwidth = doc["bandwidth"]["bytes_per_s"]
    skinny = [row for row in doc["rows"] if row["preset"] == "skinny"]
    assert len(skinny) == 2 * 7 and {row["role"] for row in skinny} == {*ROLES, "decode x·Wᵀ"}
    for row in doc["rows"]:
        target = 80.0 if row["preset"] == "skinny" else None
        assert row["target_pct_of_copy"] == target
        for name, r in row["results"].items():
            if r["status"] != "ok":
                continue
            per_s = row["bytes"] / (r["ms"] * 1e-3)
            assert r["gb_per_s"] == pytest.approx(per_s / 1e9) and r["pct_of_copy"] == pytest.approx(
                100 * per_s / bandwidth
            )
            assert r["target_met"] == (None if target is None else r["pct_of_copy"] >= target), name
            if row["bound"] == "memory":  # the roofline's memory term is the copy bandwidth
                assert r["pct_of_roofline"] == pytest.approx(r["pct_of_copy"])
    for name, summary in doc["summary"].items():
        judged = [row["results"][name].get("target_met") for row in skinny]
        assert summary["targets_met"] == judged.count(True) and summary["targets_missed"] == judged.count(False)
    assert doc["summary"]["gemmbridge"]["targets_met"] + doc["summary"]["gemmbridge"]["targets_missed"] == 14
    first = skinny[0]
    assert (first["transpose_a"], first["transpose_b"], report.shape_text(first)) == (False, True, "64×8×256:nt")


def test_the_table_marks_the_target_and_names_the_role(skinny_doc):
    text = io.StringIO()
    report.render(skinny_doc, file=text)
    out = text.getvalue()
    assert "skinny x·Aᵀ" in out and "64×8×256:nt" in out and "256×8×64:tn" in out
    marks = [r.get("target_met") for row in skinny_doc["rows"] for r in row["results"].values()]
    assert out.count("✓") == marks.count(True) + 1 and out.count("✗") == marks.count(False) + 1  # +1: the legend
    assert "skinny rows: % of the copy bandwidth" in out and "80 % target" in out
    assert "skinny target met on" in out


def test_cpu_runs_say_the_gpu_time_column_does_not_apply(skinny_doc):
    doc = skinny_doc
    assert "GPU µs/op: not applicable on the CPU" in doc["method"]
    assert any(line.endswith("; GPU µs per op: not applicable on the CPU") for line in report.footer(doc))
    small = [row for row in doc["rows"] if row["preset"] == "custom"]
    assert small and all(r["host_us"] > 0 and r["gpu_us"] is None
                         for row in small for r in row["results"].values() if r["status"] == "ok")  # fmt: skip
    broken = json.loads(json.dumps(doc))
    del broken["rows"][0]["results"]["gemmbridge"]["gpu_us"]
    del broken["rows"][1]["target_pct_of_copy"]
    with pytest.raises(ValueError, match=r"rows\[0\]\.gemmbridge\.gpu_us missing.*rows\[1\]\.target_pct_of_copy"):
        report.validate(broken)


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_the_skinny_script_writes_every_candidates_figures(tmp_path: Path):
    out = tmp_path / "skinny.json"
    result = _script("--device", "cpu", "--quick", "--rep-ms", "1", "--rounds", "1", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "gemmbridge.skinny/1" and doc["card"].startswith("CPU") and doc["date"]
    assert {"gemmbridge", "torch", "gemmbridge_git"} <= set(doc["versions"])
    assert [c["name"] for c in doc["candidates"]] == ["torch", "gemmbridge-off", "gemmbridge-auto", "gemmbridge-on"]
    kernels = hasattr(gb, "set_kernels")
    assert doc["own_kernels"]["available"] is kernels
    assert ("own kernels: not available" in result.stdout) is not kernels
    copy = doc["copy_bandwidth"]["bytes_per_s"]
    assert copy > 0 and doc["copy_bandwidth"]["nbytes"] >= 1 << 26
    assert [row["role"] for row in doc["rows"]] == [*ROLES, "decode x·Wᵀ", "decode x·Wᵀ"]
    judged = "gemmbridge-auto" if kernels else "gemmbridge-off"
    assert doc["summary"]["target"]["candidate"] == judged
    for row in doc["rows"]:
        assert row["bytes"] == (row["m"] * row["k"] + row["k"] * row["n"] + row["m"] * row["n"]) * 2  # bf16
        torch_ms = row["results"]["torch"]["ms"]
        for name, r in row["results"].items():
            if name == "gemmbridge-auto" and not kernels:
                assert r == {"status": "skipped", "reason": doc["own_kernels"]["reason"]}
                continue
            assert r["status"] == "ok" and r["rel_err"] < 1e-2, (name, r)
            assert r["us"] == pytest.approx(r["ms"] * 1e3) and r["ratio_vs_torch"] == pytest.approx(torch_ms / r["ms"])
            assert r["pct_of_copy"] == pytest.approx(100 * row["bytes"] / (r["ms"] * 1e-3) / copy)
        assert row["target_met"] == (row["results"][judged]["pct_of_copy"] >= 80)
    lines = result.stdout.splitlines()
    assert any(line.startswith("dtype  role") and "≥80%" in line for line in lines)
    assert sum(line.rstrip().endswith(("met", "MISSED")) for line in lines) == len(doc["rows"])
    assert math.isfinite(doc["summary"]["gemmbridge-off"]["geomean_ratio_vs_torch"])


# -- CUDA: the GPU-time view and the skinny paths on a GPU (run on a GPU machine) ------------------------------


@pytest.mark.gpu
def test_gpu_us_per_op_replays_a_graph_of_calls():
    torch = cuda_torch()
    from gemmbridge.bench import timing

    a, b = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    out = torch.full((64, 64), float("nan"), device="cuda")
    calls = []
    us = timing.gpu_us_per_op(lambda: calls.append(gb.matmul(a, b, out=out)), "torch", calls=10, replays=3)
    assert len(calls) == 1 + 10  # one warm-up on a side stream, ten captured; replays run no Python
    torch.cuda.synchronize()
    assert 0 < us < math.inf and torch.allclose(out, (a.double() @ b.double()).float(), rtol=1e-4, atol=1e-4)
    assert timing._event_ms(lambda: torch.mm(a, b), warmup_ms=1, rep_ms=2) > 0  # the L2-flushed fallback


@pytest.mark.gpu
def test_cuda_bench_reports_gpu_us_for_small_shapes_and_the_skinny_target(monkeypatch):
    cuda_torch()
    monkeypatch.setitem(
        presets.PRESETS["cuda"], "skinny", [*lora_roles(512, 1024, 16), *decode_steps((1,), ((2048, 1024),))]
    )
    doc = run(BenchOptions(device="cuda", presets="skinny", shapes=["64x64x64", "64x64x64x4"], dtypes="bf16,fp16",
                           rep_ms=5, rounds=1, peak_size=1024, progress=False))  # fmt: skip
    report.validate(doc)
    for row in doc["rows"]:
        for name in ("gemmbridge", "torch", "triton"):
            r = row["results"][name]
            if r["status"] == "skipped":
                continue
            assert r["status"] == "ok", (name, r)
            if row["preset"] == "custom":
                assert r["gpu_us"] > 0 and "gpu_us_reason" not in r, (name, r)
            else:
                assert r["gpu_us"] is None and isinstance(r["target_met"], bool)
        for name in ("cupy", "nvmath"):  # captured, or the reason it could not be
            r = row["results"][name]
            if r["status"] == "ok" and row["preset"] == "custom":
                assert (r["gpu_us"] or 0) > 0 or "CUDA graph" in r["gpu_us_reason"], (name, r)
    text = io.StringIO()
    report.render(doc, file=text)
    out = text.getvalue()
    assert "µs)" in out and ("✓" in out or "✗" in out)


@pytest.mark.gpu
def test_the_skinny_script_runs_quick_on_cuda(tmp_path: Path):
    cuda_torch()
    out = tmp_path / "skinny.json"
    result = _script("--quick", "--rep-ms", "5", "--rounds", "1", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    assert doc["sm_count"] > 0 and doc["versions"]["cublasLt"] and doc["copy_bandwidth"]["nbytes"] >= 256 << 20
    assert all(row["results"]["gemmbridge-off"]["status"] == "ok" for row in doc["rows"])
    assert all(isinstance(row["target_met"], bool) for row in doc["rows"])
