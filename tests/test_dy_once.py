"""The dy-once kernels without a GPU: which LoRA problems they serve, their sources through NVRTC, and the host side
(parameter blocks, cluster grid, workspace, the reduction) run for real with the kernels emulated (``kernel_emulator``)
against float64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from emulated_gpu import EmulatedFramework, on_device
from test_kernels import _nvrtc, gpu, meta  # noqa: F401 (gpu: the emulated device, a fixture)

import gemmbridge as gb
from gemmbridge.backends.cuda.kernels import compiler, dropout, lora
from gemmbridge.problem import Operands, TensorMeta, describe
from gemmbridge.reference import TOLERANCE, rel_err


def problems(t: int, o: int, r: int, dtype: str = "bfloat16", db_dtype: str | None = None, accumulate: bool = False):
    """g = dy·B and dB = dyᵀ·xa as a LoRA layer describes them (dy T × O, B O × r, xa T × r, all row-major)."""
    dy, b, xa = meta((t, o), dtype), meta((o, r), dtype), meta((t, r), dtype)
    c = meta((o, r), db_dtype or dtype) if accumulate else None
    return describe(dy, b), describe(dy, xa, transpose_a=True, c=c, out=c, out_dtype=db_dtype)


@pytest.mark.parametrize("t", [4096, 16384])
@pytest.mark.parametrize("o", [4096, 11008])
@pytest.mark.parametrize("r", [8, 16, 32])
def test_the_lora_shapes_it_serves(t, o, r):
    config = lora.configure(*problems(t, o, r))
    if r == 32 and o == 11008:  # 11 slices of 128 columns per block: 192 accumulators a thread
        assert config is None
        return
    assert config is not None and config.valid and config.rank == r and config.slices == -(-o // 1024)
    assert config.smem_bytes <= 227 * 1024 and 2 <= config.stages <= config.slices + 1
    assert lora.configure(*problems(t, o, r, db_dtype="float32", accumulate=True)).out_f32


def test_what_it_does_not_serve():
    g, db = problems(4096, 4096, 16)
    assert lora.configure(g, db) is not None
    assert lora.configure(*problems(4096, 4096, 24)) is None  # a rank the fragments do not cover
    assert lora.configure(*problems(4096, 4100, 16)) is None  # O not a multiple of 8
    assert lora.configure(*problems(4096, 4096, 16, "float32")) is None
    column_major = describe(meta((4096, 4096), order="F"), meta((4096, 16)), transpose_a=True)
    wider = describe(TensorMeta((4096, 4096), (4160, 1), "bfloat16", "cuda:0"), meta((4096, 16)), transpose_a=True)
    assert lora.configure(g, column_major) is None and lora.configure(g, wider) is None  # another dy
    with_c = describe(meta((4096, 4096)), meta((4096, 16)), c=meta((4096, 16)))
    assert lora.configure(with_c, db) is None  # g takes no C
    batched = describe(meta((2, 2048, 4096)), meta((2, 4096, 16)))
    assert lora.configure(batched, db) is None
    xa_t = describe(meta((4096, 4096)), meta((4096, 16), order="F"), transpose_a=True)
    assert lora.configure(g, xa_t) is None  # xa column-major


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_kind_compiles_for_hopper(dtype):
    """Both kernels for each rank, one and several slices per block, half and float32 dB."""
    _nvrtc()
    configs = [lora.DyOnceConfig(dtype, False, 8, 1, 2), lora.DyOnceConfig(dtype, True, 16, 4, 3),
               lora.DyOnceConfig(dtype, False, 32, 4, 3), lora.DyOnceConfig(dtype, True, 16, 11, 3)]  # fmt: skip
    for config in configs:
        assert config.valid
        for build in (config, dataclasses.replace(config, reduce=True)):
            assert compiler.compile_cubin(build, "sm_90")[:4] == b"\x7fELF", build.name


def _address(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])


@pytest.mark.parametrize("r, db_dtype, accumulate", [(16, None, False), (8, "float32", True), (32, None, True)])
def test_both_products_on_the_emulated_kernels_match_float64(gpu, rng, r, db_dtype, accumulate):  # noqa: F811
    """T = 3000 (24 row tiles over 16 clusters: some walk two), O = 1032 (two slices per block, the last blocks past
    O): g = s·dy·B and dB = s·dyᵀ·xa (+ dB, accumulated in place), each output poisoned first."""
    fake, _ = gpu
    fw = EmulatedFramework()
    t, o, s, dtype = 3000, 1032, 0.5, "bfloat16"
    dy, b, xa = (fw.from_numpy(rng.standard_normal(shape), dtype) for shape in ((t, o), (o, r), (t, r)))
    g = on_device(np.full((t, r), np.nan, dy.dtype))
    out = np.dtype(np.float32) if db_dtype else dy.dtype
    db = on_device(rng.standard_normal((o, r)).astype(out) if accumulate else np.full((o, r), np.nan, out))
    before = db.astype(np.float64)
    gemm = lora.DyOnce(*problems(t, o, r, dtype, db_dtype, accumulate), 0)
    assert gemm.clusters == 16 and gemm.workspace_bytes == 16 * o * r * 4
    workspace = on_device(np.full(gemm.workspace_bytes // 4, np.nan, np.float32))
    gemm.launch(Operands(_address(dy), _address(b), 0, _address(g)), Operands(_address(dy), _address(xa),
                _address(db) if accumulate else 0, _address(db)), s, s, 1.0 if accumulate else 0.0,
                _address(workspace), 0)  # fmt: skip
    q = {name: np.asarray(v, np.float64) for name, v in (("dy", dy), ("B", b), ("xa", xa))}
    assert rel_err(np.asarray(g, np.float64), s * q["dy"] @ q["B"]) < TOLERANCE[dtype]
    ref = s * q["dy"].T @ q["xa"] + (before if accumulate else 0)
    assert rel_err(db.astype(np.float64), ref) < TOLERANCE[dtype]
    (main, grid), (second, _) = fake.kernels.launches
    assert grid == (8, 16, 1) and main.slices == 2 and second.reduce and main.out_f32 == bool(db_dtype)


def test_a_dy_once_refuses_what_it_cannot_run(gpu, monkeypatch):  # noqa: F811
    fake, _ = gpu
    from gemmbridge.backends.cuda import kernels

    gemm = lora.DyOnce(*problems(1024, 1024, 16), 0)
    good = Operands(4096, 4096, 0, 4096), Operands(4096, 4096, 0, 4096)
    for g, db, workspace, beta in [(Operands(4096 + 8, 4096, 0, 4096), Operands(4096 + 8, 4096, 0, 4096), 4096, 0.0),
                                   (good[0], Operands(8192, 4096, 0, 4096), 4096, 0.0), (*good, 0, 0.0),
                                   (*good, 4096, 1.0)]:  # fmt: skip
        with pytest.raises(gb.OptionError, match="dy once: .* needs 16-byte aligned"):
            gemm.launch(g, db, 1.0, 1.0, beta, workspace, 0)
    with pytest.raises(gb.OptionError, match="cannot serve .* rank 24"):
        lora.DyOnce(*problems(1024, 1024, 24), 0)
    monkeypatch.setattr(kernels, "mode", "off")
    with pytest.raises(gb.BackendUnavailableError, match="compute capability 9.0"):
        lora.DyOnce(*problems(1024, 1024, 16), 0)
    assert not fake.kernels.launches


LOADED = {"the dy-once kernels": (lambda: lora.DyOnce(*problems(1024, 1024, 16), 0), "dy once: dyonce-bfloat16-r16-"),
          "a masked skinny kernel": (lambda: dropout.MaskedGemm(describe(meta((64, 2048)), meta((16, 2048)),
                                                                         transpose_b=True), 0, "a", 0.9),
                                     "dropout: the skinny kernel bfloat16-kk-.*-dropa")}  # fmt: skip


@pytest.mark.parametrize("kernel", LOADED)
@pytest.mark.parametrize("error", [OSError("no libnvrtc"), gb.VendorError("matmul: NVRTC compiling failed")])
def test_kernels_that_cannot_be_loaded_say_so(gpu, monkeypatch, kernel, error):  # noqa: F811
    """A build or load failure (no NVRTC, …) is BackendUnavailableError naming the kernel; gemmbridge's own errors
    pass unchanged (kernels.loading)."""
    from gemmbridge.backends.cuda.kernels import launch

    def fail(*args: object) -> None:
        raise error

    make, named = LOADED[kernel]
    monkeypatch.setattr(launch, "kernel", fail)
    with pytest.raises(gb.GemmError) as caught:
        make()
    if isinstance(error, gb.GemmError):
        assert caught.value is error
    else:
        assert isinstance(caught.value, gb.BackendUnavailableError) and caught.value.__cause__ is error
        assert caught.match(f"{named}.* cannot be built or loaded here: no libnvrtc")
