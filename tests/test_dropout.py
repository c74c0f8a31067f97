"""Dropout inside the skinny kernel without a GPU: the Philox reference against Random123's known answers, the mask's
layout and statistics, the tiles of the masked roles, their sources through NVRTC, and the host side (parameter block,
grid, pointers, masking role) run for real with the kernel emulated (``kernel_emulator``) against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
from emulated_gpu import EmulatedFramework, on_device
from test_kernels import _nvrtc, gpu, meta  # noqa: F401 (gpu: the emulated device, a fixture)

import gemmbridge as gb
from gemmbridge.backends.cuda.kernels import compiler, dropout
from gemmbridge.backends.cuda.kernels.config import MIN_SPLIT_TILES, Config, configure, masked
from gemmbridge.problem import Operands, describe
from gemmbridge.reference import TOLERANCE, rel_err

SMS = 132

# Random123's kat_vectors, "philox4x32 10": counter (4 words), key (2 words) → output (4 words)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_matches_random123s_known_answers(counter, key, expected):
    out = dropout.philox4x32_10(np.array([counter], np.uint32), key)
    assert out.dtype == np.uint32 and tuple(int(w) for w in out[0]) == expected


def test_the_mask_of_an_element_is_its_16_bit_half_of_one_philox_word():
    """Element index i·cols + j: counter index // 8, word (index % 8) // 2, the low half for an even index."""
    seed, keep = 0x0123456789ABCDEF, 0.7
    found = dropout.mask(seed, 5, 24, keep)
    limit = dropout.threshold(keep)
    for i, j in [(0, 0), (0, 1), (0, 7), (1, 13), (4, 23), (3, 8)]:
        index = i * 24 + j
        counter = np.array([[index // 8, 0, 0, 0]], np.uint32)
        word = int(dropout.philox4x32_10(counter, (0x89ABCDEF, 0x01234567))[0, (index % 8) // 2])
        half = word >> 16 if index % 2 else word & 0xFFFF
        assert found[i, j] == (half < limit), (i, j)
    assert np.array_equal(dropout.mask(seed, 1, 120, keep).reshape(5, 24), found)  # a function of the index alone
    assert np.array_equal(dropout.mask(seed, 1, 117, keep)[0], found.reshape(-1)[:117])  # a count not of 8s


def test_a_negative_seed_is_its_twos_complement_and_seeds_differ():
    assert np.array_equal(dropout.mask(-5, 16, 64, 0.5), dropout.mask(2**64 - 5, 16, 64, 0.5))
    assert not np.array_equal(dropout.mask(1, 16, 64, 0.5), dropout.mask(2, 16, 64, 0.5))
    assert not np.array_equal(dropout.mask(1, 16, 64, 0.5), dropout.mask(1 << 32, 16, 64, 0.5))  # the key's high word


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.05])
def test_the_mask_keeps_elements_at_the_keep_rate_independently(keep):
    """Over 2²⁰ elements the kept fraction is within 5 σ of keep; two seeds agree at keep² + (1 − keep)², and
    neighbours (in one Philox word, or one call) are as independent as far-apart elements."""
    n = 1 << 20
    a, b = dropout.mask(11, 1024, 1024, keep).reshape(-1), dropout.mask(12, 1024, 1024, keep).reshape(-1)
    sigma = math.sqrt(keep * (1 - keep) / n)
    assert abs(a.mean() - keep) < 5 * sigma and abs(b.mean() - keep) < 5 * sigma
    agree = keep**2 + (1 - keep) ** 2
    assert abs((a == b).mean() - agree) < 5 * math.sqrt(agree * (1 - agree) / n)
    for shift in (1, 2, 8, 4096):  # the other half of a word, the next word, the next call, far away
        both = (a[:-shift] & a[shift:]).mean()
        assert abs(both - keep**2) < 5 * math.sqrt(keep**2 * (1 - keep**2) / n), shift


def test_keep_is_a_probability_applied_at_a_resolution_of_2_to_the_minus_16():
    assert dropout.threshold(1.0) == 65536 and dropout.threshold(0.9) == 58983 and dropout.threshold(1e-9) == 1
    assert dropout.effective_keep(0.9) - 0.9 < 2**-16 and dropout.effective_keep(0.5) == 0.5
    assert dropout.mask(3, 8, 64, 1.0).all()
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(gb.OptionError, match="keep must be a probability"):
            dropout.threshold(bad)


def lora_roles(t: int, d: int, r: int, dtype: str = "bfloat16") -> dict[str, object]:
    """The masked GEMMs of a LoRA layer with the layouts the layer has: x·Aᵀ, gᵀ·x, g·A."""
    x, lora_a, g = meta((t, d), dtype), meta((r, d), dtype), meta((t, r), dtype)
    return {"a": describe(x, lora_a, transpose_b=True), "b": describe(g, x, transpose_a=True), "d": describe(g, lora_a)}


@pytest.mark.parametrize("t", [4096, 16384])
@pytest.mark.parametrize("r", [8, 16, 64])
def test_every_masked_role_of_a_lora_layer_has_a_tile(t, r):
    for role, problem in lora_roles(t, 4096, r).items():
        config = masked(problem, SMS, role)
        assert config is not None and config.valid and config.mask == role and f"-drop{role}" in config.name, role
        assert config.defines()["MASK"] == {"a": 1, "b": 2, "d": 3}[role]
    write = masked(lora_roles(t, 4096, r)["d"], SMS, "d")
    assert write.splits == 1 and write.bk == max(16, min(64, r)) and write.smem_bytes >= 4 * write.bm * write.bn


@pytest.mark.parametrize("t", [4096, 16384])
@pytest.mark.parametrize("r", [16, 64])
def test_masked_gt_x_and_x_at_take_more_warps_an_sm_than_the_unmasked_tiles(t, r):
    """Role b (gᵀ·x) takes a quarter of the unmasked tile's K slice and four times its split; role a (x·Aᵀ) half and
    twice where the unmasked tile splits nothing (T 16384), the unmasked tile where it does (T 4096); with too short
    a K for a further split, the unmasked tile."""
    roles = lora_roles(t, 4096, r)
    plain_b, plain_a = configure(roles["b"], SMS), configure(roles["a"], SMS)
    b, a = masked(roles["b"], SMS, "b"), masked(roles["a"], SMS, "a")
    assert (b.bk, b.splits, b.stages) == (plain_b.bk // 4, plain_b.splits * 4, plain_b.stages), b.name
    assert t >= b.splits * MIN_SPLIT_TILES * b.bk
    times = 2 if plain_a.splits == 1 else 1
    assert (a.bk, a.splits, a.stages) == (plain_a.bk // times, plain_a.splits * times, plain_a.stages), a.name
    assert (t == 16384) == (times == 2)
    short = lora_roles(256, 4096, r)["b"]  # K 256: too short for 2 splits of 4 slices of 64
    assert (masked(short, SMS, "b").bk, masked(short, SMS, "b").splits) == (configure(short, SMS).bk, 1)


def test_what_the_masked_kernel_cannot_serve_has_no_tile():
    roles = lora_roles(4096, 4096, 16)
    assert masked(roles["a"], SMS, "b") is None  # x·Aᵀ: op(b) = Aᵀ is K-contiguous, not x
    assert masked(roles["b"], SMS, "a") is None  # gᵀ·x: op(a) = gᵀ is column-major
    assert masked(roles["a"], SMS, "") is None and masked(roles["a"], SMS, "c") is None
    x_t = describe(meta((4096, 4096), order="F"), meta((16, 4096)), transpose_b=True)  # x column-major
    assert masked(x_t, SMS, "a") is None
    batched = describe(meta((2, 2048, 4096)), meta((2, 16, 4096)), transpose_b=True)
    assert masked(batched, SMS, "a") is None
    assert masked(describe(meta((4096, 4096), "float32"), meta((16, 4096), "float32"), transpose_b=True), SMS,
                  "a") is None  # fmt: skip
    assert masked(describe(meta((4096, 4096)), meta((4096, 4096)), transpose_b=True), SMS, "a") is None  # not skinny
    assert not Config("bfloat16", False, False, True, 64, 16, 64, 4, 1, 4, 1, "a").valid  # A must be K-contiguous
    assert not Config("bfloat16", False, True, True, 16, 64, 64, 1, 4, 4, 1, "b").valid  # B must be N-contiguous


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_masked_kind_and_the_mask_fill_compile_for_hopper(dtype):
    """NVRTC compiles each masked role in the tiles the roles get, float32 results (dA of float32 adapters) too."""
    _nvrtc()
    roles = lora_roles(4096, 4096, 16, dtype)
    g, x = meta((4096, 16), dtype), meta((4096, 4096), dtype)
    configs = [masked(roles[role], SMS, role) for role in "abd"]
    configs += [masked(describe(g, x, transpose_a=True, out_dtype="float32"), SMS, "b"),
                masked(lora_roles(4096, 4096, 64, dtype)["d"], SMS, "d")]  # fmt: skip
    assert configs[3].out_f32 and configs[4].bk == 64
    for config in configs:
        assert compiler.compile_cubin(config, "sm_90")[:4] == b"\x7fELF", config.name
    assert compiler.compile_cubin(dropout.FILL, "sm_90")[:4] == b"\x7fELF"


def test_the_sources_hand_nvrtc_their_headers_and_a_cached_cubin_depends_on_each(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: (13, 0))
    includes = [("skinny.cu", "pipeline.cuh"), ("dyonce.cu", "pipeline.cuh"), ("pipeline.cuh", "philox.cuh"),
                ("pipeline.cuh", "pdl.cuh"), ("mask.cu", "philox.cuh"), ("mask.cu", "pdl.cuh")]  # fmt: skip
    assert all(f'#include "{header}"' in compiler.source(file) for file, header in includes)
    assert {header for _, header in includes} == set(compiler.HEADERS)
    config = Config("bfloat16", False, True, True, 64, 16, 64, 4, 1, 4, 1, "a")
    before = compiler.cache_path(config, "sm_90")
    real = compiler.source
    for header in compiler.HEADERS:
        with monkeypatch.context() as patch:
            patch.setattr(compiler, "source", lambda file="skinny.cu", h=header: real(file) + "//" * (file == h))
            assert compiler.cache_path(config, "sm_90") != before, header
    assert compiler.cache_path(config, "sm_90") == before
    assert compiler.cache_path(dropout.FILL, "sm_90").name.startswith("fill-mask-sm_90-")


def _address(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])


def _run(role: str, problem: object, operands: dict[str, np.ndarray], alpha: float, beta: float, keep: float,
         seed: int) -> None:  # fmt: skip
    """One MaskedGemm launch on the emulated device, the seed in (host) memory like a device tensor's."""
    seed_buffer = on_device(np.array([seed], np.int64))
    gemm = dropout.MaskedGemm(problem, 0, role, keep)
    ptrs = Operands(*(_address(operands[name]) if name in operands else 0 for name in ("a", "b", "c", "d", "bias")))
    gemm.launch(ptrs, alpha, beta, _address(seed_buffer), 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_each_masked_role_on_the_emulated_kernel_matches_float64_with_the_mask(gpu, rng, dtype):  # noqa: F811
    """The host side of each role (parameter block, grid, the seed's address, which operand the mask falls on):
    xa = (1/keep)·(x ⊙ m)·Aᵀ, dA = (s/keep)·gᵀ·(x ⊙ m) in float32, t = (s/keep)·(g·A) ⊙ m accumulated onto dx."""
    fake, _ = gpu
    fw = EmulatedFramework()
    t, d, r, keep, s, seed = 64, 2048, 16, 0.8, 2.0, -77
    x, lora_a, g = (fw.from_numpy(rng.standard_normal(shape), dtype) for shape in ((t, d), (r, d), (t, r)))
    dx = fw.from_numpy(rng.standard_normal((t, d)), dtype)
    q = {name: np.asarray(v, np.float64) for name, v in (("x", x), ("A", lora_a), ("g", g), ("dx", dx))}
    m = dropout.mask(seed, t, d, keep)
    xa = on_device(np.full((t, r), np.nan, x.dtype))
    _run("a", describe(meta((t, d), dtype), meta((r, d), dtype), transpose_b=True), {"a": x, "b": lora_a, "d": xa},
         1 / keep, 0.0, keep, seed)  # fmt: skip
    assert rel_err(np.asarray(xa, np.float64), (q["x"] * m) @ q["A"].T / keep) < TOLERANCE[dtype]
    da = on_device(np.full((r, d), np.nan, np.float32))
    problem = describe(meta((t, r), dtype), meta((t, d), dtype), transpose_a=True, out_dtype="float32")
    _run("b", problem, {"a": g, "b": x, "d": da}, s / keep, 0.0, keep, seed)
    assert rel_err(da.astype(np.float64), s / keep * q["g"].T @ (q["x"] * m)) < TOLERANCE[dtype]
    problem = describe(meta((t, r), dtype), meta((r, d), dtype), c=meta((t, d), dtype), out=meta((t, d), dtype))
    _run("d", problem, {"a": g, "b": lora_a, "c": dx, "d": dx}, s / keep, 1.0, keep, seed)
    ref = s / keep * (q["g"] @ q["A"]) * m + q["dx"]
    assert rel_err(np.asarray(dx, np.float64), ref) < TOLERANCE[dtype]
    unmasked = s / keep * (q["g"] @ q["A"]) + q["dx"]
    assert rel_err(np.asarray(dx, np.float64), unmasked) > 0.1  # the mask is really there
    configs = [config for config, _ in fake.kernels.launches]
    assert [c.mask for c in configs] == ["a", "b", "d"] and configs[1].out_f32
    assert configs[0].splits > 1  # a split of K: every split masks its own range of x's columns


@pytest.mark.parametrize("dtype, t, r", [("bfloat16", 1001, 16), ("float16", 521, 64)])
def test_the_more_warps_tiles_on_a_ragged_k_match_float64_with_the_mask(gpu, rng, dtype, t, r):  # noqa: F811
    """``masked``'s smaller K slices with more splits (role a: half and twice, role b: a quarter and four times) on a
    K that is no multiple of BK · splits — x·Aᵀ's K = d = 1032, gᵀ·x's K = T odd — so the last split is short and
    the tail tile partial: xa = (1/keep)·(x ⊙ m)·Aᵀ and dA = (s/keep)·gᵀ·(x ⊙ m) against float64."""
    fake, _ = gpu
    fw = EmulatedFramework()
    d, keep, s, seed = 1032, 0.9, 2.0, 20261203
    x, lora_a, g = (fw.from_numpy(rng.standard_normal(shape), dtype) for shape in ((t, d), (r, d), (t, r)))
    q = {name: np.asarray(v, np.float64) for name, v in (("x", x), ("A", lora_a), ("g", g))}
    m = dropout.mask(seed, t, d, keep)
    roles = lora_roles(t, d, r, dtype)
    roles["b"] = describe(meta((t, r), dtype), meta((t, d), dtype), transpose_a=True, out_dtype="float32")
    xa, da = on_device(np.full((t, r), np.nan, x.dtype)), on_device(np.full((r, d), np.nan, np.float32))
    _run("a", roles["a"], {"a": x, "b": lora_a, "d": xa}, 1 / keep, 0.0, keep, seed)
    _run("b", roles["b"], {"a": g, "b": x, "d": da}, s / keep, 0.0, keep, seed)
    assert rel_err(np.asarray(xa, np.float64), (q["x"] * m) @ q["A"].T / keep) < TOLERANCE[dtype]
    assert rel_err(da.astype(np.float64), s / keep * q["g"].T @ (q["x"] * m)) < TOLERANCE[dtype]
    (a, _), (b, _) = fake.kernels.launches
    for config, role, times in ((a, "a", 2), (b, "b", 4)):
        plain = configure(roles[role], SMS)
        assert (config.bk, config.splits) == (plain.bk // times, plain.splits * times), config.name
        assert roles[role].k % (config.bk * config.splits), config.name  # ragged: the last split is short


def test_the_mask_fill_writes_the_reference_mask(gpu):  # noqa: F811
    fake, _ = gpu
    seed = on_device(np.array([987654321], np.int64))
    out = on_device(np.full(37 * 101, 0xAB, np.uint8))
    dropout.fill_mask(_address(seed), _address(out), 37, 101, 0.85, 0, device=0)
    assert np.array_equal(out.reshape(37, 101), dropout.mask(987654321, 37, 101, 0.85).astype(np.uint8))
    assert fake.kernels.launches[-1][0] is dropout.FILL


def test_a_masked_gemm_refuses_what_it_cannot_run(gpu, monkeypatch):  # noqa: F811
    """Misaligned pointers, no seed, c missing with beta ≠ 0, kernels off, an older GPU: a clear gemmbridge error,
    nothing launched (the caller falls back to the unfused path)."""
    fake, _ = gpu
    from gemmbridge.backends.cuda import kernels

    problem = describe(meta((64, 2048)), meta((16, 2048)), transpose_b=True)
    gemm = dropout.MaskedGemm(problem, 0, "a", 0.9)
    seed = on_device(np.array([1], np.int64))
    for ptrs, at in [(Operands(4096 + 2, 4096, 0, 4096, 0), _address(seed)), (Operands(4096, 4096, 0, 4096, 0), 0),
                     (Operands(4096, 4096, 0, 4096, 0), _address(seed) + 4)]:  # fmt: skip
        with pytest.raises(gb.OptionError, match="needs 16-byte aligned"):
            gemm.launch(ptrs, 1.0, 0.0, at, 0)
    with pytest.raises(gb.OptionError, match="c when beta"):
        gemm.launch(Operands(4096, 4096, 0, 4096, 0), 1.0, 1.0, _address(seed), 0)
    with pytest.raises(gb.OptionError, match="masked must be one of"):
        dropout.MaskedGemm(problem, 0, "c", 0.9)
    with pytest.raises(gb.OptionError, match="cannot serve .* with the mask on op"):
        dropout.MaskedGemm(problem, 0, "b", 0.9)
    monkeypatch.setattr(kernels, "mode", "off")
    with pytest.raises(gb.BackendUnavailableError, match="compute capability 9.0"):
        dropout.MaskedGemm(problem, 0, "a", 0.9)
    monkeypatch.setattr(kernels, "mode", "on")
    monkeypatch.setattr(kernels, "device_info", lambda device: (8, "sm_80", 108))
    with pytest.raises(gb.BackendUnavailableError, match="compute capability 9.0"):
        dropout.MaskedGemm(problem, 0, "a", 0.9)
    assert not fake.kernels.launches


def test_a_masked_configuration_is_never_restored_from_the_tuning_cache(gpu):  # noqa: F811
    from gemmbridge.backends.cuda import autotune

    source = autotune.sources["kernel"]
    problem = describe(meta((4096, 4096)), meta((16, 4096)), transpose_b=True)
    payload = source.candidates(problem, (16, 16, 16, 16), False)[0].payload
    assert source.restore(problem, (16, 16, 16, 16), False, payload) is not None
    tampered = {**payload, "config": {**payload["config"], "mask": "a"}}
    assert source.restore(problem, (16, 16, 16, 16), False, tampered) is None
