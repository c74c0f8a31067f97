"""Dropout inside the skinny kernel on a GPU: the device's mask is ``dropout.mask`` bit for bit, every masked role
matches float64 with that mask, the keep rate and the 1/keep scaling match ``nn.Dropout``'s statistics, and a CUDA
graph that redraws the seed on the stream gives a fresh mask in every replay, the same one to every role."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("needs a CUDA GPU of compute capability 9.0 or later", allow_module_level=True)

from gemmbridge.backends.cuda import kernels  # noqa: E402
from gemmbridge.backends.cuda.kernels import dropout  # noqa: E402
from gemmbridge.backends.cuda.kernels.config import configure, masked  # noqa: E402
from gemmbridge.problem import Operands, TensorMeta, describe  # noqa: E402

pytestmark = pytest.mark.gpu
HALF = [torch.bfloat16, torch.float16]


def meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."), f"cuda:{t.device.index}")


def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device="cuda").to(dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def seed_tensor(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device="cuda")


def device_mask(seed: int, rows: int, cols: int, keep: float) -> torch.Tensor:
    return torch.from_numpy(dropout.mask(seed, rows, cols, keep)).cuda()


def run(role: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, alpha: float, keep: float, seed: torch.Tensor,
        c: torch.Tensor | None = None, beta: float = 0.0, **flags: bool) -> None:  # fmt: skip
    """One masked GEMM: d = alpha · op(a) @ op(b) (masked by role) + beta · c."""
    problem = describe(meta(a), meta(b), c=None if c is None else meta(c), out=meta(d), **flags)
    ptrs = Operands(a.data_ptr(), b.data_ptr(), 0 if c is None else c.data_ptr(), d.data_ptr(), 0)
    dropout.MaskedGemm(problem, d.device.index, role, keep).launch(ptrs, alpha, beta, seed.data_ptr(), stream())


@pytest.mark.parametrize("rows, cols", [(4096, 4096), (37, 101), (1, 7)])
@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_the_device_mask_is_the_reference_bit_for_bit(rows, cols, keep):
    """fill_mask, to an aligned buffer and to one a byte off (its byte-wise path), for seeds of either sign."""
    for value in (12345, -(2**62) - 3, 2**63 - 1):
        seed = seed_tensor(value)
        expected = dropout.mask(value, rows, cols, keep).astype(np.uint8)
        buffer = torch.full((rows * cols + 1,), 7, dtype=torch.uint8, device="cuda")
        for offset in (0, 1):
            out = buffer[offset : offset + rows * cols]
            dropout.fill_mask(seed.data_ptr(), out.data_ptr(), rows, cols, keep, stream(), device=0)
            assert np.array_equal(out.view(rows, cols).cpu().numpy(), expected), (value, offset)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("t", [4096, 1000])
@pytest.mark.parametrize("r", [16, 64])
def test_every_role_matches_float64_with_the_mask(dtype, t, r):
    """xa = (1/keep)·(x ⊙ m)·Aᵀ; dA = (s/keep)·gᵀ·(x ⊙ m) in float32; t = (s/keep)·(g·A) ⊙ m alone (beta 0) and
    accumulated onto dx (beta 1, c = d); each output poisoned first, each the mask of one seed."""
    d, keep, s = 4096, 0.9, 2.0
    value = int(torch.randint(-(2**62), 2**62, (1,)).item())
    seed, m = seed_tensor(value), device_mask(value, t, d, keep).double()
    x, lora_a, g = rand(t, d, dtype=dtype), rand(r, d, dtype=dtype), rand(t, r, dtype=dtype)
    xm = x.double() * m
    xa = torch.full((t, r), float("nan"), dtype=dtype, device="cuda")
    run("a", x, lora_a, xa, 1 / keep, keep, seed, transpose_b=True)
    da = torch.full((r, d), float("nan"), device="cuda")
    run("b", g, x, da, s / keep, keep, seed, transpose_a=True, out_dtype="float32")
    product = torch.full((t, d), float("nan"), dtype=dtype, device="cuda")
    run("d", g, lora_a, product, s / keep, keep, seed)
    dx = rand(t, d, dtype=dtype)
    before = dx.double()
    run("d", g, lora_a, dx, s / keep, keep, seed, c=dx, beta=1.0)
    torch.cuda.synchronize()
    ga = g.double() @ lora_a.double()
    cases = {"a": (xa, xm @ lora_a.double().T / keep), "b": (da, s / keep * g.double().T @ xm),
             "d": (product, s / keep * ga * m), "d accumulated": (dx, s / keep * ga * m + before)}  # fmt: skip
    for role, (found, ref) in cases.items():
        assert rel_err(found, ref) < 1e-2, (role, rel_err(found, ref))
    assert (product[m == 0] == 0).all() and (product[m == 1] != 0).float().mean() > 0.99  # zeros exactly where dropped
    assert rel_err(xa, x.double() @ lora_a.double().T / keep) > 0.1  # the mask is really applied


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("t, r", [(1001, 16), (4104, 64)])
def test_the_more_warps_tiles_on_a_ragged_k_match_float64_with_the_mask(dtype, t, r):
    """x·Aᵀ (K = d = 1032) and gᵀ·x (K = T: odd, or 4096 + 8) in ``masked``'s tiles with smaller K slices and more
    splits than ``configure``'s, K no multiple of BK · splits: each split masks its own range of K (the mask's index
    from the global K offset), the last split is short and its tail tile partial; each output poisoned first."""
    d, keep, s = 1032, 0.9, 2.0
    value = int(torch.randint(-(2**62), 2**62, (1,)).item())
    seed, m = seed_tensor(value), device_mask(value, t, d, keep).double()
    x, lora_a, g = rand(t, d, dtype=dtype), rand(r, d, dtype=dtype), rand(t, r, dtype=dtype)
    xa = torch.full((t, r), float("nan"), dtype=dtype, device="cuda")
    da = torch.full((r, d), float("nan"), device="cuda")
    sms = kernels.device_info(0)[2]
    f32 = {"transpose_a": True, "out_dtype": "float32"}
    roles = {"a": (x, lora_a, xa, {"transpose_b": True}), "b": (g, x, da, f32)}
    for role, (a, b, out, flags) in roles.items():
        problem = describe(meta(a), meta(b), out=meta(out), **flags)
        tile = masked(problem, sms, role)
        assert tile.splits > configure(problem, sms).splits and problem.k % (tile.bk * tile.splits), tile.name
    run("a", x, lora_a, xa, 1 / keep, keep, seed, transpose_b=True)
    run("b", g, x, da, s / keep, keep, seed, transpose_a=True, out_dtype="float32")
    torch.cuda.synchronize()
    xm = x.double() * m
    assert rel_err(xa, xm @ lora_a.double().T / keep) < 1e-2
    assert rel_err(da, s / keep * g.double().T @ xm) < 1e-2


def test_keep_rate_and_scaling_match_nn_dropout():
    """x of ones, A = 1/d: each element of xa is a row's kept fraction over keep. Its mean over rows is 1 and its
    variance (1 − keep) / (keep · d), within the sampling error, as for ``nn.functional.dropout`` of the same x."""
    t, d, r, keep = 4096, 4096, 16, 0.9
    x, lora_a = torch.ones(t, d, dtype=torch.bfloat16, device="cuda"), torch.full((r, d), 1 / d, device="cuda")
    seed = seed_tensor(2024)
    xa = torch.full((t, r), float("nan"), device="cuda")
    run("a", x, lora_a.bfloat16(), xa, 1 / keep, keep, seed, transpose_b=True, out_dtype="float32")
    ours = xa[:, 0].double()
    theirs = torch.nn.functional.dropout(x.float(), p=1 - keep).mean(1).double()
    variance = (1 - keep) / (keep * d)
    for rows in (ours, theirs):
        assert abs(rows.mean().item() - 1) < 5 * math.sqrt(variance / t)
        assert abs(rows.var().item() / variance - 1) < 5 * math.sqrt(2 / t)
    assert torch.equal(xa, xa[:, :1].expand(t, r))  # every column of A sees the same mask
    kept = torch.empty(t * d, dtype=torch.uint8, device="cuda")
    dropout.fill_mask(seed.data_ptr(), kept.data_ptr(), t, d, keep, stream(), device=0)
    rate = kept.double().mean().item()
    assert abs(rate - dropout.effective_keep(keep)) < 5 * math.sqrt(keep * (1 - keep) / (t * d))
    assert torch.allclose(xa[:, 0].double(), kept.view(t, d).double().mean(1) / keep, rtol=1e-5)


def test_a_cuda_graph_that_redraws_the_seed_gives_fresh_masks_the_same_to_every_role():
    """The seed drawn inside the graph by torch's generator (as the LoRA layer draws it): each replay a new seed, and
    the forward (x·Aᵀ) and the backward (gᵀ·x) of one replay see the same mask."""
    t, d, r, keep = 1024, 4096, 16, 0.8
    x, lora_a, g = rand(t, d), rand(r, d), rand(t, r)
    seed = seed_tensor(0)
    xa = torch.full((t, r), float("nan"), dtype=torch.bfloat16, device="cuda")
    da = torch.full((r, d), float("nan"), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and load outside the capture
            seed.random_()
            run("a", x, lora_a, xa, 1 / keep, keep, seed, transpose_b=True)
            run("b", g, x, da, 1 / keep, keep, seed, transpose_a=True, out_dtype="float32")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            seed.random_()
            run("a", x, lora_a, xa, 1 / keep, keep, seed, transpose_b=True)
            run("b", g, x, da, 1 / keep, keep, seed, transpose_a=True, out_dtype="float32")
    torch.cuda.current_stream().wait_stream(side)
    seen = set()
    for _ in range(3):
        xa.fill_(float("nan"))
        da.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        value = int(seed.item())
        seen.add(value)
        m = device_mask(value, t, d, keep).double()
        assert rel_err(xa, (x.double() * m) @ lora_a.double().T / keep) < 1e-2
        assert rel_err(da, g.double().T @ (x.double() * m) / keep) < 1e-2
    assert len(seen) == 3


def test_edges_of_small_odd_shapes():
    """Tiles cut by the edges: T and r not multiples of the tile, K shorter than one slice (memcheck runs this)."""
    t, d, r, keep = 200, 520, 24, 0.7
    seed = seed_tensor(99)
    m = device_mask(99, t, d, keep).double()
    x, lora_a, g = rand(t, d), rand(r, d), rand(t, r)
    xa, product = (torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda") for shape in ((t, r), (t, d)))
    da = torch.full((r, d), float("nan"), device="cuda")
    run("a", x, lora_a, xa, 1 / keep, keep, seed, transpose_b=True)
    run("b", g, x, da, 1 / keep, keep, seed, transpose_a=True, out_dtype="float32")
    run("d", g, lora_a, product, 1 / keep, keep, seed)
    torch.cuda.synchronize()
    assert rel_err(xa, (x.double() * m) @ lora_a.double().T / keep) < 1e-2
    assert rel_err(da, g.double().T @ (x.double() * m) / keep) < 1e-2
    assert rel_err(product, (g.double() @ lora_a.double()) * m / keep) < 1e-2
