"""Programmatic dependent launch (PDL) without a GPU: every kernel's PTX waits for its predecessor before its first
access to memory and lets its dependents go only after that wait; the launches carry the attribute through one
CUlaunchConfig per kernel and stream, and fall back to plain launches where PDL is switched off, the GPU is older
than sm_90 or the driver refuses it (the kernels emulated, ``kernel_emulator``). docs/kernels.md, "The skinny
sequence at copy speed"."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest
from emulated_gpu import EMULATED_DEVICE, EmulatedFramework, on_device
from test_dy_once import problems
from test_kernels import _nvrtc, gpu, meta  # noqa: F401 (gpu: the emulated device, a fixture)

import gemmbridge as gb
from gemmbridge.backends.cuda.kernels import compiler, dropout, launch, lora
from gemmbridge.backends.cuda.kernels.config import Config
from gemmbridge.problem import Operands, describe
from gemmbridge.reference import TOLERANCE, rel_err

needs_v2 = pytest.mark.skipif(launch._v2 is None, reason="cuda-bindings without _v2: no PDL launches")

_SKINNY = [
    Config("bfloat16", False, True, True, 64, 16, 256, 4, 1, 3, 8, "a"),  # x·Aᵀ with dropout, K split over a cluster
    Config("bfloat16", True, False, False, 16, 64, 128, 1, 4, 4, 1, "b"),  # gᵀ·x with dropout, float32 dA
    Config("float16", False, True, False, 64, 128, 16, 2, 2, 2, 1, "d"),  # g·A masked, beta·C
    Config("bfloat16", False, True, True, 64, 16, 256, 4, 1, 3, 1),  # no dropout, one block per tile
    Config("float16", True, False, True, 16, 64, 128, 1, 4, 4, 4),  # a short result, split K, float32
]
_BUILDS = [*_SKINNY, lora.DyOnceConfig("bfloat16", True, 16, 4, 3), dropout.FILL]
_SPACES = ("global", "shared", "local", "param", "const")


def _touches_memory(line: str) -> bool:
    """A PTX instruction that may read or write global memory: ld / st / atom / red / prefetch in the global or the
    generic state space, and every cp.async (its source is global)."""
    words = line.split()
    if not words:
        return False
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    parts = op.split(".")
    if parts[0] == "cp" and len(parts) > 1 and parts[1] == "async":
        return not op.startswith(("cp.async.commit_group", "cp.async.wait_group"))
    if parts[0] not in ("ld", "ldu", "st", "atom", "red", "prefetch"):
        return False
    space = next((p for p in parts[1:] if p.split("::")[0] in _SPACES), "generic")
    return space in ("global", "generic")


def _entries(ptx: str) -> dict[str, list[str]]:
    """Each kernel's body, by name, as lines."""
    found: dict[str, list[str]] = {}
    for part in re.split(r"^\.visible \.entry ", ptx, flags=re.M)[1:]:
        name = part.split("(", 1)[0]
        found[name] = part.splitlines()
    return found


@pytest.mark.parametrize("build", _BUILDS, ids=lambda b: b.name)
def test_every_kernel_waits_for_its_predecessor_before_it_touches_memory(build):
    """In the PTX of each kernel (skinny in each mask role and split, dy-once and its reduction, the mask fill),
    ``griddepcontrol.wait`` comes before every instruction that may touch global memory — the seed's read included —
    and ``griddepcontrol.launch_dependents`` after it; no call hides an access from this reading."""
    _nvrtc()
    builds = [build, dataclasses.replace(build, reduce=True)] if isinstance(build, lora.DyOnceConfig) else [build]
    seen = {}
    for each in builds:
        seen.update(_entries(compiler.compile_ptx(each, "compute_90")))
    assert set(seen) == {b.kernel_name.decode() for b in builds}
    for name, lines in seen.items():
        assert not any(line.split()[:1] == ["call"] or ".func" in line for line in lines), name
        waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
        accesses = [i for i, line in enumerate(lines) if _touches_memory(line)]
        triggers = [i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line]
        assert waits and accesses and waits[0] < accesses[0], (name, lines[accesses[0]] if accesses else None)
        assert all(i > waits[0] for i in triggers), name
        if name != "gemmbridge_fill_mask":  # the kernels of a LoRA layer's sequence let the next one start early
            assert triggers, name


def test_the_reading_of_ptx_finds_the_accesses_it_must():
    """The classifier above: global and generic loads, stores and copies count; shared, param and local ones don't."""
    touching = ["ld.global.u64 %rd1, [%rd2];", "@%p1 st.global.v4.u32 [%rd1], {%r1};", "ld.v2.f32 {%f1}, [%rd1];",
                "cp.async.cg.shared.global [%r1], [%rd1], 16, %r2;", "ld.global.nc.v4.u32 {%r1}, [%rd2];",
                "red.global.add.f32 [%rd1], %f1;"]  # fmt: skip
    assert all(map(_touches_memory, touching))
    assert not any(map(_touches_memory, ["ld.param.u64 %rd1, [p];", "ld.shared.v4.u32 {%r1}, [%r2];",
                                         "ld.shared::cluster.v4.f32 {%f1}, [%r1];", "cp.async.wait_group 1;",
                                         "cp.async.commit_group;", "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r1}, "
                                         "[%r2];", "griddepcontrol.wait;", "mov.u32 %r1, %tid.x;"]))  # fmt: skip


def test_below_sm_90_the_grid_controls_compile_to_nothing():
    """The mask fill, the one kernel an older GPU runs, compiles for sm_80 without griddepcontrol."""
    _nvrtc()
    ptx = compiler.compile_ptx(dropout.FILL, "compute_80")
    assert "gemmbridge_fill_mask" in ptx and "griddepcontrol" not in ptx


def _address(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])


def _lora_sequence(rng: np.random.Generator, streams: tuple[int, ...]) -> tuple[dict[str, np.ndarray], Any]:
    """The lane's own kernels of a LoRA layer's step, on the emulated device, each output poisoned first: the masked
    x·Aᵀ on each of ``streams``, dy-once (g, dB), the masked gᵀ·x and g·A, the mask fill; checked against float64.
    Returns the outputs and the forward's ``MaskedGemm``."""
    fw = EmulatedFramework()
    t, d, r, keep, s, seed = 256, 1024, 16, 0.8, 2.0, 4321
    x, lora_a, dy, lora_b = (fw.from_numpy(rng.standard_normal(shape), "bfloat16")
                             for shape in ((t, d), (r, d), (t, d), (d, r)))  # fmt: skip
    seed_buffer = on_device(np.array([seed], np.int64))
    seed_at = _address(seed_buffer)
    shapes = {"xa": ((t, r), x.dtype), "g": ((t, r), x.dtype), "dB": ((d, r), np.float32), "dA": ((r, d), np.float32),
              "t": ((t, d), x.dtype)}  # fmt: skip
    out = {name: on_device(np.full(shape, np.nan, dtype)) for name, (shape, dtype) in shapes.items()}
    out["mask"] = on_device(np.full(t * d, 7, np.uint8))
    forward = dropout.MaskedGemm(describe(meta((t, d)), meta((r, d)), transpose_b=True), 0, "a", keep)
    for stream in streams:
        forward.launch(Operands(_address(x), _address(lora_a), 0, _address(out["xa"]), 0), 1 / keep, 0.0, seed_at,
                       stream)  # fmt: skip
    once = lora.DyOnce(*problems(t, d, r, db_dtype="float32"), 0)
    workspace = on_device(np.full(once.workspace_bytes // 4, np.nan, np.float32))
    once.launch(Operands(_address(dy), _address(lora_b), 0, _address(out["g"])),
                Operands(_address(dy), _address(out["xa"]), 0, _address(out["dB"])), s, 1.0, 0.0, _address(workspace),
                streams[-1])  # fmt: skip
    masked_b = dropout.MaskedGemm(describe(meta((t, r)), meta((t, d)), transpose_a=True, out_dtype="float32"), 0, "b",
                                  keep)  # fmt: skip
    masked_b.launch(Operands(_address(out["g"]), _address(x), 0, _address(out["dA"]), 0), 1 / keep, 0.0, seed_at,
                    streams[-1])  # fmt: skip
    masked_d = dropout.MaskedGemm(describe(meta((t, r)), meta((r, d))), 0, "d", keep)
    masked_d.launch(Operands(_address(out["g"]), _address(lora_a), 0, _address(out["t"]), 0), 1 / keep, 0.0, seed_at,
                    streams[-1])  # fmt: skip
    dropout.fill_mask(seed_at, _address(out["mask"]), t, d, keep, streams[-1], device=0)
    q = {name: np.asarray(v, np.float64) for name, v in (("x", x), ("A", lora_a), ("dy", dy), ("B", lora_b))}
    m = dropout.mask(seed, t, d, keep)
    xa = (q["x"] * m) @ q["A"].T / keep
    g = s * q["dy"] @ q["B"]
    refs = {"xa": xa, "g": g, "dB": q["dy"].T @ np.asarray(out["xa"], np.float64), "dA": g.T @ (q["x"] * m) / keep,
            "t": (g @ q["A"]) * m / keep}  # fmt: skip
    for name, ref in refs.items():
        assert rel_err(np.asarray(out[name], np.float64), ref) < TOLERANCE["bfloat16"], name
    assert np.array_equal(out["mask"], m.reshape(-1).astype(np.uint8))
    return out, forward


@pytest.fixture
def pdl_on(monkeypatch):
    """PDL switched on (off by default: docs/kernels.md)."""
    monkeypatch.setattr(launch, "pdl", True)


@needs_v2
def test_the_lane_kernels_launch_with_pdl_through_one_config_per_kernel_and_stream(gpu, rng, pdl_on):  # noqa: F811
    """Every launch of the sequence carries the attribute (the emulated driver reads the CUlaunchConfig); the forward
    launched twice on stream 7 and once on stream 9 made two configurations, each reused, never rebuilt."""
    fake, _ = gpu
    _, forward = _lora_sequence(rng, (7, 7, 9))
    assert fake.kernels.programmatic == [True] * 8 and fake.kernels.streams == [7, 7, 9, 9, 9, 9, 9, 9]
    kinds = [config.name for config, _ in fake.kernels.launches]
    assert kinds[0] == kinds[1] == kinds[2] and len(set(kinds)) == 6  # the forward thrice, then five kernels
    first, again, other = fake.kernels.launch_configs[:3]
    assert first == again != other and set(forward.plan.enqueue._configs) == {7, 9}


@needs_v2
def test_pdl_switched_off_launches_the_same_kernels_plainly_with_the_same_results(gpu, rng, monkeypatch, pdl_on):  # noqa: F811
    fake, _ = gpu
    with_pdl = _lora_sequence(np.random.default_rng(5), (0,))[0]
    monkeypatch.setattr(launch, "pdl", False)
    without = _lora_sequence(np.random.default_rng(5), (0,))[0]
    assert fake.kernels.programmatic == [True] * 6 + [False] * 6
    assert all(np.array_equal(with_pdl[name], without[name], equal_nan=True) for name in with_pdl)


@needs_v2
def test_a_gpu_older_than_sm_90_never_gets_the_attribute(gpu, monkeypatch, pdl_on):  # noqa: F811
    """The mask fill, which runs below compute capability 9.0, launches plainly there."""
    fake, _ = gpu
    from gemmbridge.backends.cuda import tuning_cache

    monkeypatch.setitem(tuning_cache._devices, 0, {**EMULATED_DEVICE, "capability": "8.0"})
    seed = on_device(np.array([99], np.int64))
    out = on_device(np.full(40 * 24, 7, np.uint8))
    dropout.fill_mask(_address(seed), _address(out), 40, 24, 0.5, 0, device=0)
    assert np.array_equal(out, dropout.mask(99, 40, 24, 0.5).reshape(-1).astype(np.uint8))
    assert fake.kernels.programmatic == [False]


@needs_v2
def test_a_driver_that_refuses_pdl_gets_plain_launches_from_then_on(gpu, rng, monkeypatch, pdl_on):  # noqa: F811
    """CUDA_ERROR_NOT_SUPPORTED from cuLaunchKernelEx: that launch and every later one go without the attribute, and
    the results are right."""
    fake, _ = gpu
    refused: list[int] = []

    def refuse(config: int, f: int, params: int, extra: int) -> None:
        refused.append(f)
        raise launch._v2.NotSupportedError(launch._v2.Result.ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(launch, "_launch_ex", refuse)
    monkeypatch.setattr(launch, "_pdl_refused", False)
    _lora_sequence(rng, (0, 0))
    assert len(refused) == 1 and fake.kernels.programmatic == [False] * 7 and launch._pdl_refused


@needs_v2
def test_another_driver_error_of_a_pdl_launch_is_a_vendor_error_naming_the_kernel(gpu, monkeypatch, pdl_on):  # noqa: F811
    def fail(config: int, f: int, params: int, extra: int) -> None:
        raise launch._v2.InvalidValueError(launch._v2.Result.ERROR_INVALID_VALUE)

    monkeypatch.setattr(launch, "_launch_ex", fail)
    gemm = dropout.MaskedGemm(describe(meta((64, 1024)), meta((16, 1024)), transpose_b=True), 0, "a", 0.9)
    seed = on_device(np.array([1], np.int64))
    with pytest.raises(gb.VendorError, match="launching the skinny kernel for .* with dropout failed"):
        gemm.launch(Operands(4096, 4096, 0, 4096, 0), 1.0, 0.0, _address(seed), 0)
    assert not launch._pdl_refused
