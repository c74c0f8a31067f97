"""The skinny kernel without a GPU: its dispatch rule, its source through NVRTC, its disk cache, and its host side
run for real with the kernel's arithmetic emulated (``kernel_emulator``) behind the emulated CUDA backend."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from emulated_gpu import EmulatedFramework, install

import gemmbridge as gb
from gemmbridge.backends.cuda.kernels import compiler
from gemmbridge.backends.cuda.kernels.config import (
    AUTO_MAX_NARROW,
    AUTO_MAX_STREAMED,
    MAX_SPLITS,
    SKINNY,
    Config,
    candidates,
    choose,
    configure,
    eligible,
)
from gemmbridge.problem import TensorMeta, describe
from gemmbridge.reference import TOLERANCE, rel_err

SMS = 132


def meta(shape: tuple[int, ...], dtype: str = "bfloat16", order: str = "C") -> TensorMeta:
    strides = [1] * len(shape)
    dims = range(len(shape) - 1, -1, -1) if order == "C" else range(len(shape))
    step = 1
    for i in dims:
        strides[i] = step
        step *= shape[i]
    return TensorMeta(shape, tuple(strides), dtype, "cuda:0")


def lora_problems(t: int, d: int, r: int, dtype: str = "bfloat16") -> dict[str, object]:
    """The five GEMMs of a LoRA linear layer with the layouts a layer really has (row-major x, dy, A, B)."""
    x, dy, xa = meta((t, d), dtype), meta((t, d), dtype), meta((t, r), dtype)
    lora_a, lora_b = meta((r, d), dtype), meta((d, r), dtype)
    return {
        "x·Aᵀ": describe(x, lora_a, transpose_b=True),
        "xa·Bᵀ": describe(xa, lora_b, transpose_b=True),
        "dy·B": describe(dy, lora_b),
        "dyᵀ·xa": describe(dy, xa, transpose_a=True),
        "dyBᵀ·x": describe(xa, x, transpose_a=True),
    }


READ_BOUND = ("x·Aᵀ", "dy·B", "dyᵀ·xa", "dyBᵀ·x")


@pytest.mark.parametrize("t", [4096, 16384])
@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_read_bound_lora_gemm_has_a_tile_that_fills_the_gpu(t, r, dtype):
    problems = lora_problems(t, 4096, r, dtype)
    for role in READ_BOUND:
        problem = problems[role]
        config = configure(problem, SMS)
        assert config is not None and config.valid, role
        tiles = -(-problem.m // config.bm) * -(-problem.n // config.bn)
        assert tiles * config.splits >= SMS // 2, (role, config)
        assert config.splits <= MAX_SPLITS and config.smem_bytes <= 227 * 1024
        assert [c.splits for c in candidates(problem, SMS)][0] == config.splits
    assert configure(problems["xa·Bᵀ"], SMS) is None  # write-bound: cuBLASLt (docs/kernels.md)
    assert configure(problems["x·Aᵀ"], SMS).a_kcontig and configure(problems["x·Aᵀ"], SMS).b_kcontig
    assert not configure(problems["dyᵀ·xa"], SMS).a_kcontig and not configure(problems["dyᵀ·xa"], SMS).b_kcontig


@pytest.mark.parametrize("t", [4096, 16384])
@pytest.mark.parametrize("r", [8, 16, 64])
def test_the_measured_rule_takes_the_kernel_where_it_won(t, r):
    """Rank 8 with 32 MiB streamed (0.98–1.18× cuBLASLt on an H200, docs/kernels.md); not rank 16 (0.92–1.00×) or
    64 (0.61–0.67×), nor anything at T = 16384 (0.44–0.97×)."""
    problems = lora_problems(t, 4096, r)
    chosen = {role for role, problem in problems.items() if choose(problem, SMS) is not None}
    assert chosen == (set(READ_BOUND) if t == 4096 and r == 8 else set())
    assert AUTO_MAX_NARROW == 8 and 32 * 2**20 <= AUTO_MAX_STREAMED < 112 * 2**20


@pytest.mark.parametrize("m", [1, 4, 8, 16])
def test_decode_shapes_split_k_and_take_the_kernel_up_to_8_rows_and_48_mib(m):
    small = describe(meta((m, 4096)), meta((4096, 4096)), transpose_b=True)
    large = describe(meta((m, 4096)), meta((14336, 4096)), transpose_b=True)
    config = configure(small, SMS)
    assert config is not None and config.bm == 16 and config.splits > 1
    assert choose(small, SMS) == (config if m <= 8 else None)  # 1.02–1.17× at M ≤ 8, 0.96× at 16
    assert choose(large, SMS) is None and configure(large, SMS) is not None


def test_what_the_kernel_does_not_serve_stays_on_cublaslt():
    x, w = meta((4096, 4096)), meta((16, 4096))
    assert configure(describe(x, w, transpose_b=True), SMS) is not None
    assert configure(describe(meta((4096, 4096)), meta((4096, 4096))), SMS) is None  # not skinny
    fp32 = describe(meta((4096, 4096), "float32"), meta((16, 4096), "float32"), transpose_b=True)
    assert configure(fp32, SMS) is None
    assert configure(describe(x, w, transpose_b=True, epilogue="relu"), SMS) is None
    assert not eligible(describe(meta((4096, 4092)), meta((16, 4092)), transpose_b=True))  # K-contiguous, K % 8
    assert not eligible(describe(meta((4096, 64)), meta((64, 12))))  # N % 8
    assert SKINNY == 128


def test_the_split_of_k_covers_k_in_whole_slices():
    problem = describe(meta((4096, 4096)), meta((16, 4096)), transpose_b=True)
    config = configure(problem, SMS)
    assert config is not None and config.splits > 1
    split = -(-problem.k // config.splits)
    per_split = -(-split // config.bk) * config.bk
    assert per_split % config.bk == 0 and per_split * config.splits >= problem.k


def test_config_names_are_distinct_and_macros_complete():
    configs = {c for t in (4096, 16384) for r in (8, 64) for p in lora_problems(t, 4096, r).values()
               for c in candidates(p, SMS)}  # fmt: skip
    configs |= {replace(c, mask="a") for c in configs if c.a_kcontig} | {replace(c, mask="b") for c in configs
                                                                        if not c.b_kcontig}  # fmt: skip
    assert len({c.name for c in configs}) == len(configs) > 16
    for c in configs:
        assert set(c.defines()) == {"HALF_BF16", "OUT_F32", "A_KCONTIG", "B_KCONTIG", "BM", "BN",
                                    "BK", "WM", "WN", "STAGES", "SPLITS", "MASK"}  # fmt: skip
        assert all(re.search(rf"\b{name}\b", compiler.source()) for name in c.defines())  # skinny.cu reads each


def _nvrtc() -> None:
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    try:
        compiler.nvrtc_version()
    except Exception as error:  # no libnvrtc on this machine
        pytest.skip(f"NVRTC unavailable: {error}")
    del nvrtc


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("out_f32", [False, True])
def test_every_kind_of_config_compiles_for_hopper(dtype, out_f32):
    """NVRTC compiles the kernel for sm_90 in each operand order and tile shape the dispatcher makes."""
    _nvrtc()
    shapes = [Config(dtype, out_f32, ak, bk, 64, 128, 32, 2, 4, 2, 1) for ak in (True, False) for bk in (True, False)]
    shapes += [Config(dtype, out_f32, True, True, 64, 16, 64, 4, 1, 4, 8), Config(dtype, out_f32, False, False, 16,
               64, 64, 1, 4, 4, 8), Config(dtype, out_f32, True, False, 128, 64, 64, 1, 4, 4, 2)]  # fmt: skip
    for config in shapes:
        assert compiler.compile_cubin(config, "sm_90")[:4] == b"\x7fELF", config.name


def test_a_compile_error_is_a_vendor_error_with_the_log(monkeypatch):
    _nvrtc()
    monkeypatch.setattr(compiler, "source", lambda file="skinny.cu": "this is not CUDA")
    with pytest.raises(gb.VendorError, match="NVRTC compiling .* failed"):
        compiler.compile_cubin(Config("bfloat16", False, True, True, 64, 16, 64, 4, 1, 4, 1), "sm_90")


def test_cubins_are_cached_on_disk_and_a_corrupted_one_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: (13, 0))
    built: list[str] = []
    monkeypatch.setattr(compiler, "compile_cubin", lambda config, arch: built.append(arch) or b"\x7fELF" + b"x" * 8)
    config = Config("bfloat16", False, True, True, 64, 16, 64, 4, 1, 4, 1)
    assert compiler.cubin(config, "sm_90") == b"\x7fELFxxxxxxxx"
    assert compiler.cubin(config, "sm_90") == b"\x7fELFxxxxxxxx" and built == ["sm_90"]
    path = compiler.cache_path(config, "sm_90")
    assert path.parent == tmp_path / "kernels" and not list(path.parent.glob("*.tmp"))
    path.write_bytes(b"garbage")
    assert compiler.cubin(config, "sm_90") == b"\x7fELFxxxxxxxx" and built == ["sm_90", "sm_90"]
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: (13, 5))  # another NVRTC: another file
    compiler.cubin(config, "sm_90")
    assert len(built) == 3


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    found = install(monkeypatch)
    yield found
    gb.clear_cache()


def _check(result: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    assert rel_err(np.asarray(result, np.float64), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("r", [8, 16, 40])
def test_lora_gemms_run_on_the_kernel_through_the_backend(gpu, rng, dtype, r):
    """Each LoRA GEMM, with the layouts a layer has, runs on the (emulated) kernel and matches float64."""
    fake, _ = gpu
    fw = EmulatedFramework()
    t, d = 1024, 256
    x64, dy64 = rng.standard_normal((t, d)), rng.standard_normal((t, d))
    a64, b64, xa64 = rng.standard_normal((r, d)), rng.standard_normal((d, r)), rng.standard_normal((t, r))
    x, dy, xa, lora_a, lora_b = (fw.from_numpy(v, dtype) for v in (x64, dy64, xa64, a64, b64))
    q = {k: np.asarray(v, np.float64) for k, v in (("x", x), ("dy", dy), ("xa", xa), ("A", lora_a), ("B", lora_b))}
    cases = [
        (gb.matmul(x, lora_a, transpose_b=True), q["x"] @ q["A"].T),
        (gb.matmul(xa, lora_b, transpose_b=True), q["xa"] @ q["B"].T),
        (gb.matmul(dy, lora_b), q["dy"] @ q["B"]),
        (gb.matmul(dy, xa, transpose_a=True), q["dy"].T @ q["xa"]),
        (gb.matmul(xa, x, transpose_a=True), q["xa"].T @ q["x"]),
    ]
    for result, ref in cases:
        _check(result, ref, dtype)
    assert len(fake.kernels.launches) == 4 and fake.matmuls == 1  # xa·Bᵀ is write-bound: cuBLASLt


def test_alpha_beta_c_bias_batch_and_float32_results_on_the_kernel(gpu, rng):
    fake, _ = gpu
    fw = EmulatedFramework()
    a64, b64 = rng.standard_normal((3, 512, 256)), rng.standard_normal((3, 256, 16))
    c64, bias64 = rng.standard_normal((3, 512, 16)), rng.standard_normal(16)
    a, b = fw.from_numpy(a64, "bfloat16"), fw.from_numpy(b64, "bfloat16")
    c, bias = fw.from_numpy(c64, "float32"), fw.from_numpy(bias64, "float32")
    result = gb.matmul(a, b, c=c, alpha=0.5, beta=2.0, bias=bias, out_dtype="float32")
    ref = 0.5 * np.asarray(a, np.float64) @ np.asarray(b, np.float64) + 2.0 * c64 + bias64
    assert result.dtype == np.float32
    _check(result, ref, "bfloat16")  # inputs rounded to bf16
    assert fake.kernels.launches and fake.kernels.launches[-1][0].out_f32


def test_accumulating_into_the_result_in_place(gpu, rng):
    """``c`` is ``out`` (a gradient accumulated in place): the kernel reads each element before writing it."""
    fake, _ = gpu
    fw = EmulatedFramework()
    a, b = fw.from_numpy(rng.standard_normal((512, 256)), "bfloat16"), fw.from_numpy(rng.standard_normal((256, 16)),
                                                                                     "bfloat16")  # fmt: skip
    out = fw.from_numpy(rng.standard_normal((512, 16)), "bfloat16")
    ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64) + np.asarray(out, np.float64)
    assert gb.matmul(a, b, c=out, beta=1.0, out=out) is out
    _check(out, ref, "bfloat16")
    assert fake.kernels.launches


def test_set_kernels_off_keeps_every_problem_on_cublaslt(gpu, rng):
    fake, _ = gpu
    fw = EmulatedFramework()
    a, b = fw.from_numpy(rng.standard_normal((512, 256)), "bfloat16"), fw.from_numpy(rng.standard_normal((256, 16)),
                                                                                     "bfloat16")  # fmt: skip
    try:
        gb.set_kernels("off")
        gb.matmul(a, b)
        assert not fake.kernels.launches and fake.matmuls == 1
        gb.set_kernels("on")
        gb.matmul(a, b)
        assert len(fake.kernels.launches) == 1
    finally:
        gb.set_kernels("auto")
    with pytest.raises(gb.OptionError, match="set_kernels: mode must be one of"):
        gb.set_kernels("always")


def test_a_misaligned_pointer_takes_cublaslt_for_that_call(gpu, rng):
    fake, _ = gpu
    fw = EmulatedFramework()
    base = fw.from_numpy(rng.standard_normal(512 * 256 + 1), "bfloat16")
    a = base[1:].reshape(512, 256)  # 2 bytes off the allocation's alignment
    b = fw.from_numpy(rng.standard_normal((256, 16)), "bfloat16")
    _check(gb.matmul(a, b), np.asarray(a, np.float64) @ np.asarray(b, np.float64), "bfloat16")
    assert not fake.kernels.launches and fake.matmuls == 1


def test_the_tuner_is_offered_the_kernel_and_its_cached_choice_restores(gpu):
    """The skinny kernel is a tuning source (``autotune.add_source``): its candidates launch, and a cached payload
    comes back only while it still fits the problem's dtypes, operand orders and pointer alignments."""
    from gemmbridge.backends.cuda import autotune, kernels

    source = autotune.sources["kernel"]
    assert isinstance(source, kernels.KernelSource)
    problem = describe(meta((4096, 4096)), meta((16, 4096)), transpose_b=True)
    offered = source.candidates(problem, (16, 16, 16, 16), False)
    assert [c.payload["config"]["splits"] for c in offered] == [c.splits for c in candidates(problem, SMS)]
    assert source.candidates(problem, (16, 8, 16, 16), False) == []  # a pointer the kernel cannot read
    payload = offered[0].payload
    restored = source.restore(problem, (16, 16, 16, 16), False, payload)
    assert restored is not None and restored.payload == payload
    other = describe(meta((4096, 4096), "float16"), meta((16, 4096), "float16"), transpose_b=True)
    assert source.restore(other, (16, 16, 16, 16), False, payload) is None  # another dtype
    assert source.restore(problem, (16, 16, 16, 16), False, {"backend": "kernel", "config": {"bm": 3}}) is None


@pytest.mark.parametrize(
    "change",
    [{"wm": 0}, {"splits": 0}, {"bk": 0}, {"bm": "64"}, {"stages": 1}, {"splits": 16}, {"dtype": "float32"},
     {"out_f32": 1}],
)  # fmt: skip
def test_a_malformed_cached_kernel_choice_is_ignored_never_an_error(gpu, change):
    """What a corrupted or hand-edited tuning cache holds for the kernel: never launched, never raised."""
    from gemmbridge.backends.cuda import autotune

    source = autotune.sources["kernel"]
    problem = describe(meta((4096, 4096)), meta((16, 4096)), transpose_b=True)
    payload = source.candidates(problem, (16, 16, 16, 16), False)[0].payload
    broken = {**payload, "config": {**payload["config"], **change}}
    assert source.restore(problem, (16, 16, 16, 16), False, broken) is None
    assert source.restore(problem, (16, 16, 16, 16), False, {**payload, "source": "another kernel"}) is None
    assert source.restore(problem, (16, 16, 16, 16), False, payload) is not None


def test_grids_the_hardware_cannot_launch_stay_on_cublaslt():
    """gridDim.y holds the M tiles and gridDim.z the batch times the splits of K: at most 65535 each."""
    batched = describe(meta((70000, 8, 32)), meta((70000, 32, 8)))
    tall = describe(meta((64, 65536, 4096)), meta((8, 4096)), transpose_b=True)
    assert configure(batched, SMS) is None and choose(batched, SMS) is None and configure(tall, SMS) is None
    assert configure(describe(meta((65535 * 64, 64)), meta((8, 64)), transpose_b=True), SMS) is not None
    many = describe(meta((40000, 8, 4096)), meta((40000, 4096, 8)))  # one split fits, two would not
    assert configure(many, SMS) is not None
    assert all(c.splits * many.batch_count <= 65535 for c in candidates(many, SMS))


def test_a_cached_cubin_the_driver_cannot_load_is_compiled_again(monkeypatch, tmp_path):
    from cuda.bindings import driver as real

    from gemmbridge.backends.cuda.kernels import launch

    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(compiler, "compile_cubin", lambda config, arch: b"\x7fELF good")
    config = Config("bfloat16", False, True, True, 64, 16, 64, 4, 1, 4, 1)
    path = compiler.cache_path(config, "sm_90")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF damaged")
    loaded: list[bytes] = []

    class Driver:
        CUresult = real.CUresult
        CUfunction_attribute = real.CUfunction_attribute
        CUstreamCaptureMode = real.CUstreamCaptureMode

        def cuThreadExchangeStreamCaptureMode(self, mode):  # type: ignore[no-untyped-def]
            return real.CUresult.CUDA_SUCCESS, mode

        def cuLibraryLoadData(self, data, *args):  # type: ignore[no-untyped-def]
            loaded.append(data)
            return (real.CUresult.CUDA_SUCCESS if data == b"\x7fELF good" else real.CUresult.CUDA_ERROR_INVALID_IMAGE,
                    "library")  # fmt: skip

        def cuLibraryGetKernel(self, library, name):  # type: ignore[no-untyped-def]
            return real.CUresult.CUDA_SUCCESS, "kernel"

    monkeypatch.setattr(launch, "driver", Driver())
    monkeypatch.setattr(launch, "_kernels", {})
    assert launch.kernel(config, 0, "sm_90") == "kernel"
    assert loaded == [b"\x7fELF damaged", b"\x7fELF good"] and path.read_bytes() == b"\x7fELF good"


def test_a_k_that_no_split_divides_is_covered_in_whole_slices(gpu, rng):
    """K = 8200 over a cluster of 8: each split gets whole BK slices (the last one short), and the sum is right."""
    fake, _ = gpu
    fw = EmulatedFramework()
    x, w = fw.from_numpy(rng.standard_normal((64, 8200)), "bfloat16"), fw.from_numpy(rng.standard_normal((8, 8200)),
                                                                                    "bfloat16")  # fmt: skip
    _check(gb.matmul(x, w, transpose_b=True), np.asarray(x, np.float64) @ np.asarray(w, np.float64).T, "bfloat16")
    ((config, grid),) = fake.kernels.launches
    assert config.splits == 8 and grid[2] == 8
