"""``gemmbridge bench`` on tiny sizes: shapes and dtypes, the JSON schema, the plot, skipped and wrong candidates.

CPU tests run everywhere; the ``gpu`` ones check the CUDA candidates (Triton kernel included) for correctness.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cuda_torch

from gemmbridge.bench import candidates, report
from gemmbridge.bench.data import DTYPES, parse_dtypes
from gemmbridge.bench.peaks import roofline
from gemmbridge.bench.presets import PRESETS, Shape, parse_shape, preset_shapes
from gemmbridge.bench.runner import BenchOptions, run
from gemmbridge.errors import OptionError

TINY = {"rep_ms": 1.0, "rounds": 1, "peak_size": 48, "progress": False}


def tiny(**kwargs) -> dict:
    options = BenchOptions(device="cpu", **{**TINY, **kwargs})
    return run(options)


def test_shapes_parse_and_presets_are_named():
    assert parse_shape("4096x16x4096") == Shape(4096, 16, 4096)
    assert parse_shape("64×64×64×32") == Shape(64, 64, 64, 32)
    for bad in ("12x", "4x4", "0x4x4", "axbxc"):
        with pytest.raises(OptionError, match="MxNxK|zero"):
            parse_shape(bad)
    for device in ("cpu", "cuda"):
        assert set(PRESETS[device]) == {"square", "llm", "lora", "small", "skinny"}
        lora = preset_shapes(device, ["lora"])
        assert {s.n for s in lora if s.n <= 64} == {8, 16, 32, 64}  # T×r×d, r in 8..64
        assert {s.k for s in lora if s.k <= 64} == {8, 16, 32, 64}  # T×d×r
    assert len(preset_shapes("cpu", ["all"])) == sum(len(v) for v in PRESETS["cpu"].values())
    with pytest.raises(OptionError, match="unknown preset"):
        preset_shapes("cpu", ["huge"])
    assert [d.label for d in parse_dtypes("bf16, fp32,bf16")] == ["bf16", "fp32"]
    with pytest.raises(OptionError, match="--dtype"):
        parse_dtypes("int8")


def test_roofline_names_the_bound_that_applies():
    square = roofline(Shape(4096, 4096, 4096), DTYPES["bf16"], peak_tflops=700.0, bytes_per_s=3e12)
    assert square["bound"] == "compute" and square["roofline_tflops"] == 700.0
    lora = roofline(Shape(4096, 16, 4096), DTYPES["bf16"], peak_tflops=700.0, bytes_per_s=3e12)
    intensity = 2 * 4096 * 16 * 4096 / ((4096 * 4096 + 4096 * 16 + 4096 * 16) * 2)
    assert lora["bound"] == "memory" and lora["roofline_tflops"] == pytest.approx(3e12 * intensity / 1e12)


def test_cli_writes_a_table_a_valid_json_and_a_plot(tmp_path: Path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--device", "cpu", "--shape", "32x48x16", "--shape", "16x16x16x3", "--dtype", "fp32,fp64",
            "--rep-ms", "1", "--rounds", "1", "--peak-size", "48", "--no-progress",
            "--json", str(out_json), "--plot", str(out_png)]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "gemmbridge.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gemmbridge bench" in result.stdout and "measured peak fp32" in result.stdout
    assert "copy bandwidth" in result.stdout
    doc = json.loads(out_json.read_text())
    report.validate(doc)
    assert doc["device"] == "cpu" and doc["card"].startswith("CPU") and doc["versions"]["gemmbridge"]
    assert doc["settings"]["dtypes"] == ["fp32", "fp64"]
    assert [(r["dtype"], r["m"], r["n"], r["k"], r["batch"]) for r in doc["rows"]] == [
        ("fp32", 32, 48, 16, 1), ("fp32", 16, 16, 16, 3), ("fp64", 32, 48, 16, 1), ("fp64", 16, 16, 16, 3),
    ]  # fmt: skip
    names = [c["name"] for c in doc["candidates"]]
    assert names == ["gemmbridge", "torch", "numpy", "triton", "cupy", "nvmath"]
    for row in doc["rows"]:
        assert row["baseline"] == "numpy" and row["bound"] in ("compute", "memory")
        for name in ("gemmbridge", "numpy"):
            r = row["results"][name]
            assert r["status"] == "ok", r
            assert r["rel_err"] < DTYPES[row["dtype"]].tolerance
            assert r["tflops"] > 0 and r["ms"] == min(r["ms_runs"]) and r["host_us"] > 0  # tiny shapes: host µs too
            assert r["host_us"] == pytest.approx(r["ms"] * 1e3)  # on the CPU: the same measurement, never two
            assert r["pct_of_roofline"] > 0  # timing decides whether a cache-resident shape passes 100 %
        assert row["results"]["numpy"]["ratio"] == pytest.approx(1.0)
    assert doc["peaks"]["fp32"]["tflops"] > 0 and doc["bandwidth"]["bytes_per_s"] > 0
    assert "┃" not in result.stdout and "│" not in result.stdout  # piped: the plain table
    table = result.stdout.splitlines()[3:7]
    assert [line.split()[:2] for line in table] == [["fp32", "32×48×16"], ["fp32", "3×"], ["fp64", "32×48×16"],
                                                    ["fp64", "3×"]]  # one line per row  # fmt: skip
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


def test_missing_candidates_are_listed_with_reasons_never_dropped():
    doc = tiny(shapes=["24x24x24"], candidates="gemmbridge,numpy")
    listing = {c["name"]: c for c in doc["candidates"]}
    assert set(listing) == {"gemmbridge", "torch", "numpy", "triton", "cupy", "nvmath"}
    assert listing["torch"]["reason"] == "not selected (--candidates)"
    for name in ("triton", "cupy", "nvmath"):
        assert not listing[name]["available"] and "CUDA" in listing[name]["reason"]
    row = doc["rows"][0]
    assert row["results"]["cupy"] == {"status": "skipped", "reason": listing["cupy"]["reason"]}
    text = io.StringIO()
    report.render(doc, file=text)
    assert "cupy       skipped: runs on CUDA only; this run is on the CPU" in text.getvalue()
    assert "--device cuda" not in text.getvalue()  # not a fix on a CPU run
    with pytest.raises(OptionError, match="unknown"):
        tiny(shapes=["8x8x8"], candidates="gemmbridge,cublas")


def test_half_types_skip_numpy_with_a_reason_and_fall_back_to_torch():
    pytest.importorskip("torch")
    doc = tiny(shapes=["32x16x24"], dtypes="bf16,tf32", max_spread=1e9)
    assert doc["settings"]["dtypes"] == ["bf16"] and "tf32 skipped" in doc["notes"][0]
    row = doc["rows"][0]
    assert row["results"]["numpy"]["status"] == "skipped" and "plain loop" in row["results"]["numpy"]["reason"]
    assert row["baseline"] == "torch" and row["results"]["gemmbridge"]["status"] == "ok"
    footer = report.footer(doc)
    assert "skipped on all rows: numpy multiplies bfloat16 in a plain loop, not its BLAS" in "\n".join(footer)
    mixed_doc = tiny(shapes=["8x8x8"], dtypes="fp32,bf16", candidates="gemmbridge,numpy,torch", max_spread=1e9)
    mixed = report.footer(mixed_doc)
    assert any(line.endswith("skipped on 1/2 rows: numpy multiplies bfloat16 in a plain loop, not its BLAS")
               for line in mixed)  # fmt: skip
    # the baseline changes with the dtype: the table says so, and the geo-means are never mixed
    assert "ratios are to the row's baseline, the framework's matmul: numpy on fp32 rows; torch on bf16 rows (numpy: " \
        "numpy multiplies bfloat16 in a plain loop, not its BLAS)" in mixed  # fmt: skip
    ratios = mixed_doc["summary"]["gemmbridge"]["ratios"]
    assert set(ratios) == {"numpy", "torch"} and ratios["torch"]["rows"] == ratios["numpy"]["rows"] == 1
    assert ratios["torch"]["geomean"] == pytest.approx(mixed_doc["rows"][1]["results"]["gemmbridge"]["ratio"])
    (standing,) = [line for line in mixed if line.startswith("  gemmbridge ")]
    assert "× numpy over 1 row (min" in standing and "× torch over 1 row (min" in standing


class _Wrong(candidates.Gemmbridge):
    def prepare(self, a, b, dtype):
        return lambda: np.matmul(a, b) * 1.01


class _Raises(candidates.Gemmbridge):
    def prepare(self, a, b, dtype):
        raise RuntimeError("planted failure")


@pytest.mark.parametrize(("kind", "status", "reason"), [(_Wrong, "wrong", "tolerance"), (_Raises, "error", "planted")])
def test_a_wrong_or_failing_candidate_is_reported_not_timed(monkeypatch, kind, status, reason):
    monkeypatch.setattr(candidates, "ALL", (kind, *candidates.ALL[1:]))
    doc = tiny(shapes=["40x24x32"], candidates="gemmbridge,numpy")
    report.validate(doc)
    r = doc["rows"][0]["results"]["gemmbridge"]
    assert r["status"] == status and reason in r["reason"]
    assert "ms" not in r and "tflops" not in r
    assert doc["rows"][0]["results"]["numpy"]["status"] == "ok"
    assert doc["summary"]["gemmbridge"]["failures"]
    from gemmbridge import cli

    assert cli.main(["bench", "--device", "cpu", "--shape", "8x8x8", "--rep-ms", "1", "--rounds", "1",
                     "--peak-size", "16", "--no-progress", "--candidates", "gemmbridge,numpy"]) == 1  # fmt: skip


def test_schema_check_names_what_is_missing():
    doc = tiny(shapes=["8x8x8"], candidates="gemmbridge,numpy")
    report.validate(doc)
    broken = json.loads(json.dumps(doc))
    del broken["rows"][0]["results"]["cupy"]
    broken["candidates"][3]["reason"] = None
    del broken["bandwidth"]
    with pytest.raises(ValueError, match="bandwidth"):
        report.validate(broken)
    broken["bandwidth"] = doc["bandwidth"]
    with pytest.raises(ValueError, match="every candidate.*triton is unavailable with no reason|triton"):
        report.validate(broken)


@pytest.mark.parametrize(
    ("given", "flag"),
    [({"rounds": 0}, "--rounds 0"), ({"rep_ms": 0.0}, "--rep-ms 0"), ({"rep_ms": -1.0}, "--rep-ms -1"),
     ({"peak_size": 0}, "--peak-size 0"), ({"peak_size": -8}, "--peak-size -8")],
)  # fmt: skip
def test_values_that_cannot_run_are_refused(given, flag):
    with pytest.raises(OptionError, match=flag):
        tiny(shapes=["8x8x8"], **given)


def test_an_80_column_table_cuts_no_number():
    doc = tiny(shapes=["8x8x8", "2048x11008x64", "16x8x4x2"], candidates="gemmbridge,numpy,torch")
    for row in doc["rows"]:  # as on CUDA: five candidates, host µs of three digits, GPU µs per op of two
        row["results"]["numpy"] = {"status": "skipped", "reason": "runs on the CPU only; this run is on CUDA"}
        row["in_cache"] = False
        for name in ("gemmbridge", "torch", "triton", "cupy", "nvmath"):
            row["results"][name] = {**row["results"]["gemmbridge"], "host_us": 136.7, "gpu_us": 12.25, "stable": True,
                                    "ratio_stable": True}  # fmt: skip
    text = io.StringIO()
    report.render(doc, file=text, width=80, rich=True)  # a terminal 80 columns wide
    lines = text.getvalue().splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in text.getvalue()
    table = "\n".join(line for line in lines if line[:1] in "┃│")
    for row in doc["rows"]:
        assert f"{row['results']['gemmbridge']['tflops']:.4g}" in table and report.shape_text(row) in table
    assert "136.7µs" in table and "(12.2µs)" in table


def test_cells_over_the_roofline_are_explained_not_capped():
    doc = tiny(shapes=["8x8x8"], candidates="gemmbridge,numpy")
    results = doc["rows"][0]["results"]
    results["gemmbridge"]["pct_of_roofline"], results["numpy"]["pct_of_roofline"] = 60.0, 100.0
    assert not any("over 100 %" in line for line in report.footer(doc))
    results["numpy"]["pct_of_roofline"] = 104.0  # a cache-resident shape beat the copy bandwidth
    assert any(line.startswith("1 cell(s) over 100 % of the bound") for line in report.footer(doc))
    text = io.StringIO()
    report.render(doc, file=text)
    assert "104%" in text.getvalue()  # reported as measured


def test_the_plot_draws_the_roofline_as_a_line():
    pytest.importorskip("matplotlib")
    from gemmbridge.bench.plot import figure

    doc = tiny(shapes=["8x8x8", "64x64x64", "4096x16x64"], candidates="gemmbridge,numpy")
    ax = figure(doc).axes[0]
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith("roofline")]
    x, y = line.get_data()
    peak, bandwidth = doc["peaks"]["fp32"]["tflops"], doc["bandwidth"]["bytes_per_s"]
    assert len(x) > 10 and line.get_linestyle() == "-" and line.get_linewidth() >= 1.5
    assert np.allclose(y, np.minimum(peak, bandwidth * np.asarray(x) / 1e12))
    assert min(x) <= min(r["intensity"] for r in doc["rows"]) and max(x) >= max(r["intensity"] for r in doc["rows"])


@pytest.mark.parametrize("rich", ["missing", "not a terminal"])
def test_the_plain_table_has_one_line_per_row_and_aligned_columns(monkeypatch, rich):
    doc = tiny(shapes=["8x8x8", "16x8x4x2", "200x100x50"], candidates="gemmbridge,numpy")
    if rich == "missing":
        monkeypatch.setitem(sys.modules, "rich.console", None)  # import rich.console → ImportError
    text = io.StringIO()
    report.render(doc, file=text, rich=None if rich == "missing" else False)
    lines = text.getvalue().splitlines()
    assert "┃" not in text.getvalue() and "│" not in text.getvalue()
    assert lines[1].split() == ["gemmbridge", "numpy"] and lines[2].split()[:4] == ["dtype", "shape", "M×N×K", "preset"]
    body = lines[3:6]
    assert [line.split()[:2] for line in body] == [["fp32", "8×8×8"], ["fp32", "2×"], ["fp32", "200×100×50"]]
    start = lines[1].index("gemmbridge")
    ends = {tuple(match.end() for match in re.finditer("µs|×|%|base", line[start:])) for line in body}
    assert len(ends) == 1 and len(ends.pop()) == 2 * 3  # each part of both candidates ends in one column
    assert start < lines[2].index("TFLOP/s", start) < lines[1].index("numpy")  # the name over its columns
    assert lines[6].startswith("measured peak fp32") and not any(line.startswith(" ") for line in lines[6:9])


# -- CUDA: the candidates and the Triton kernel are right (run on a GPU machine) -------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("label", ["bf16", "fp16", "tf32", "fp32"])
@pytest.mark.parametrize("shape", [(256, 192, 128, 1), (100, 72, 40, 3), (64, 8, 1000, 1)])
def test_triton_gemm_matches_float64(label, shape):
    torch = cuda_torch()
    pytest.importorskip("triton")
    from gemmbridge.bench import triton_gemm

    m, n, k, batch = shape
    dtype = DTYPES[label]
    a = torch.randn(*((batch,) if batch > 1 else ()), m, k, device="cuda", dtype=getattr(torch, dtype.name))
    b = torch.randn(*((batch,) if batch > 1 else ()), k, n, device="cuda", dtype=a.dtype)
    got = triton_gemm.matmul(a, b, allow_tf32=dtype.tf32)
    ref = a.double() @ b.double()
    assert got.shape == ref.shape and got.dtype == a.dtype
    assert ((got.double() - ref).norm() / ref.norm()).item() < dtype.tolerance
    assert triton_gemm.matmul(a.mT.contiguous().mT, b, allow_tf32=dtype.tf32).shape == got.shape  # strided a


@pytest.mark.gpu
def test_cuda_bench_checks_and_times_every_available_candidate():
    cuda_torch()
    doc = run(BenchOptions(device="cuda", shapes=["256x128x64", "64x64x64x4"], dtypes="bf16,fp32", rep_ms=5,
                           rounds=1, peak_size=512, progress=False))  # fmt: skip
    report.validate(doc)
    available = [c["name"] for c in doc["candidates"] if c["available"]]
    assert {"gemmbridge", "torch"} <= set(available)
    for row in doc["rows"]:
        assert row["baseline"] == "torch"
        for name in available:
            assert row["results"][name]["status"] in ("ok", "skipped"), (name, row["results"][name])
        assert row["results"]["gemmbridge"]["status"] == "ok"


def test_a_negative_seed_is_refused_in_one_line():
    with pytest.raises(OptionError, match="--seed -1: at least 0"):
        tiny(seed=-1)
    found = subprocess.run([sys.executable, "-m", "gemmbridge.cli", "bench", "--seed", "-1", "--device", "cpu"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert found.returncode == 2 and found.stderr == "gemmbridge bench: --seed -1: at least 0\n", found.stderr


def test_rounds_repeat_until_the_best_two_agree():
    from gemmbridge.bench.timing import settle, spread

    times = {"steady": [10.0, 10.2], "noisy": [10.0, 30.0, 25.0, 20.0, 18.0, 16.0], "late": [50.0, 20.0, 20.5],
             "broken": [math.nan]}  # fmt: skip
    given = {name: iter(values) for name, values in times.items()}
    calls: list[str] = []

    def measure(name: str) -> float:
        calls.append(name)
        return next(given[name])

    got = settle(list(times), measure, rounds=2, max_rounds=6, max_spread=0.05)
    assert {k: v for k, v in got.items() if k != "broken"} == {k: v for k, v in times.items() if k != "broken"}
    assert len(got["broken"]) == 1 and math.isnan(got["broken"][0])  # a failed measurement is not repeated
    assert calls[:7] == ["steady", "noisy", "late", "broken", "steady", "noisy", "late"]  # interleaved
    assert spread([10.0, 10.2, 12.0]) == pytest.approx(0.02) and spread([1.0]) is None
    assert spread(got["noisy"]) == pytest.approx(0.6)  # still 60 % apart after six rounds: unstable


def test_unstable_cells_are_marked_and_left_out_of_the_geo_means(monkeypatch):
    from gemmbridge.bench import measure

    drift = itertools.count(1.0)  # gemmbridge's every round slower than its last: never settles

    def device_ms(fn, device, rep_ms):
        return float(next(drift)) if fn.__qualname__.startswith("Gemmbridge.") else 1.0

    monkeypatch.setattr(measure, "device_ms", device_ms)
    doc = tiny(shapes=["8x8x8", "16x8x8"], candidates="gemmbridge,numpy", rounds=2, max_rounds=4)
    report.validate(doc)
    for row in doc["rows"]:
        mine, base = row["results"]["gemmbridge"], row["results"]["numpy"]
        assert len(mine["ms_runs"]) == 4 and mine["stable"] is False and mine["spread"] > 0.05
        assert len(base["ms_runs"]) == 2 and base["stable"] is True and base["spread"] == 0
        assert mine["ratio_stable"] is False and base["ratio_stable"] is True
        assert report.cell_parts(mine, baseline=False)["tflops"].startswith(report.UNSTABLE)
        assert report.cell_parts(base, baseline=True)["ratio"] == "base"
    summary = doc["summary"]["gemmbridge"]
    assert summary["ratios"] == {} and summary["unstable_rows"] == 2
    footer = "\n".join(report.footer(doc))
    assert "2 cell(s) still did (~: unstable, left out of the geo-means)" in footer
    assert "gemmbridge timed on 2/2 rows (2 rows left out: unstable)" in footer


def test_operands_in_the_cpu_cache_are_bounded_by_the_peak_alone():
    fits = roofline(Shape(64, 64, 64), DTYPES["fp32"], peak_tflops=1.0, bytes_per_s=1e9, cache_bytes=1 << 20)
    assert fits == {"intensity": pytest.approx(64 / 6), "in_cache": True, "roofline_tflops": 1.0, "bound": "compute"}
    out = roofline(Shape(64, 64, 64), DTYPES["fp32"], peak_tflops=1.0, bytes_per_s=1e9, cache_bytes=1 << 10)
    assert out["bound"] == "memory" and not out["in_cache"]
    doc = tiny(shapes=["8x8x8", "64x64x64"], candidates="gemmbridge,numpy")
    if doc["bandwidth"]["cache_bytes"] is None:
        pytest.skip("the CPU's cache sizes are not readable here")
    assert all(row["in_cache"] and row["bound"] == "compute" for row in doc["rows"])
    assert all(r["pct_of_roofline"] <= 100 * (1 + 1e-12) for row in doc["rows"] for r in row["results"].values()
               if r["status"] == "ok")  # fmt: skip
    assert not any("over 100 %" in line for line in report.footer(doc))


def test_a_busy_host_is_noted():
    from gemmbridge.bench.runner import busy_note

    assert busy_note([0.4, 3.1], 2) == ("the host was busy: load average up to 3.1 on 2 cores while timing; timings "
                                        "include other processes' work (see the unstable cells)")  # fmt: skip
    assert busy_note([0.5, None], 2) is None and busy_note([None, None], 2) is None


@pytest.mark.parametrize(
    ("given", "message"),
    [({"max_rounds": 1, "rounds": 2}, "--max-rounds 1: at least --rounds (2)"),
     ({"max_spread": 0.0}, "--max-spread 0: a positive percentage")],
)  # fmt: skip
def test_settling_options_that_cannot_run_are_refused(given, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        tiny(shapes=["8x8x8"], **given)


@pytest.mark.parametrize("api", ["legacy", "fp32_precision", "global fp32_precision"])
def test_a_dtypes_tf32_setting_on_cuda_comes_back_whichever_torch_api_set_it(api, tf32_start) -> None:
    """``gemmbridge bench`` sets torch's TF32 setting for each dtype's block on CUDA (torch's matmul candidate) and
    restores it. Once torch's new API was used, reading the legacy flag raises ("mix of the legacy and new APIs"):
    the bench crashed there, as tune_model had."""
    import torch

    from gemmbridge.arrays.torch import tf32_policy
    from gemmbridge.bench.runner import _tf32

    for start in (False, True):
        tf32_start(api, start)
        before = torch.backends.cuda.matmul.fp32_precision
        for label, inside in (("tf32", True), ("fp32", False), ("bf16", start)):
            with _tf32("cuda", DTYPES[label]):
                assert tf32_policy() is inside
            assert tf32_policy() is start and torch.backends.cuda.matmul.fp32_precision == before
