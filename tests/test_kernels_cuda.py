"""The skinny kernel on a GPU: every LoRA and decode role against float64, the contract's options, streams,
graph capture and the other frameworks — each test also checks that the kernel, not cuBLASLt, ran."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("needs a CUDA GPU of compute capability 9.0 or later", allow_module_level=True)

import gemmbridge as gb  # noqa: E402
from gemmbridge.backends.cuda.kernels import launch  # noqa: E402

pytestmark = pytest.mark.gpu
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def launches(monkeypatch):
    """The kernel launches made during the test (the configuration's name of each), with the kernel taken wherever
    it can serve a problem (mode "on"; the measured rule of "auto" is tested on the CPU)."""
    made: list[str] = []
    real = launch.KernelPlan.launch

    def counting(self, *args):
        made.append(self.config.name)
        return real(self, *args)

    monkeypatch.setattr(launch.KernelPlan, "launch", counting)
    gb.set_kernels("on")
    yield made
    gb.set_kernels("auto")


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda").to(dtype)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("t", [4096, 1000])
@pytest.mark.parametrize("r", [8, 16, 64, 128])
def test_the_five_lora_gemms(launches, dtype, t, r):
    d = 4096
    x, dy, xa, lora_a, lora_b = rand(t, d, dtype=dtype), rand(t, d, dtype=dtype), rand(t, r, dtype=dtype), rand(
        r, d, dtype=dtype), rand(d, r, dtype=dtype)  # fmt: skip
    cases = {
        "x·Aᵀ": (gb.matmul(x, lora_a, transpose_b=True), x.double() @ lora_a.double().T),
        "xa·Bᵀ": (gb.matmul(xa, lora_b, transpose_b=True), xa.double() @ lora_b.double().T),
        "dy·B": (gb.matmul(dy, lora_b), dy.double() @ lora_b.double()),
        "dyᵀ·xa": (gb.matmul(dy, xa, transpose_a=True), dy.double().T @ xa.double()),
        "dyBᵀ·x": (gb.matmul(xa, x, transpose_a=True), xa.double().T @ x.double()),
    }
    for role, (result, ref) in cases.items():
        assert result.dtype == dtype and result.shape == ref.shape, role
        assert rel_err(result, ref) < 1e-2, (role, rel_err(result, ref))
    assert len(launches) == 4, launches  # xa·Bᵀ is write-bound: cuBLASLt


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", [1, 4, 8, 16, 40])
@pytest.mark.parametrize("out_features", [4096, 14336])
def test_decode_shapes(launches, dtype, m, out_features):
    x, w = rand(m, 4096, dtype=dtype), rand(out_features, 4096, dtype=dtype)
    result = gb.matmul(x, w, transpose_b=True)
    assert rel_err(result, x.double() @ w.double().T) < 1e-2
    assert launches


@pytest.mark.parametrize("dtype", HALF)
def test_alpha_beta_c_bias_and_a_float32_result(launches, dtype):
    a, b = rand(3, 2048, 1024, dtype=dtype), rand(3, 1024, 32, dtype=dtype)
    c, bias = torch.randn(3, 2048, 32, device="cuda"), torch.randn(32, device="cuda")
    out = poisoned(3, 2048, 32, dtype=torch.float32)
    result = gb.matmul(a, b, c=c, alpha=0.5, beta=-2.0, bias=bias, out_dtype="float32", out=out)
    ref = 0.5 * a.double() @ b.double() - 2.0 * c.double() + bias.double()
    assert result is out and rel_err(result, ref) < 1e-2
    c16, bias16 = c.to(dtype), bias.to(dtype)
    result = gb.matmul(a, b, c=c16, alpha=0.5, beta=-2.0, bias=bias16)
    assert rel_err(result, 0.5 * a.double() @ b.double() - 2.0 * c16.double() + bias16.double()) < 1e-2
    assert len(launches) == 2 and "f32" in launches[0]


def test_accumulating_a_gradient_in_place(launches):
    x, dy, grad = rand(4096, 4096), rand(4096, 16), rand(4096, 16)
    ref = grad.double() + 0.25 * x.double().T @ dy.double()
    assert gb.matmul(x, dy, transpose_a=True, c=grad, alpha=0.25, beta=1.0, out=grad) is grad
    assert rel_err(grad, ref) < 1e-2 and launches


def test_strided_views_and_a_broadcast_batch(launches):
    base = rand(4096, 4160)
    x = base[:, 64:]  # ld 4160
    lora_a = rand(3, 16, 4096)
    result = gb.matmul(x, lora_a, transpose_b=True)  # x broadcast against a batch of 3
    assert result.shape == (3, 4096, 16)
    assert rel_err(result, x.double() @ lora_a.double().transpose(-1, -2)) < 1e-2 and launches


def test_inside_a_cuda_graph_and_on_other_streams(launches):
    x, lora_a = rand(4096, 4096), rand(16, 4096)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gb.matmul(x, lora_a, transpose_b=True)  # compile and load outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = gb.matmul(x, lora_a, transpose_b=True)
    for _ in range(3):
        x.copy_(rand(4096, 4096))
        lora_a.copy_(rand(16, 4096))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, x.double() @ lora_a.double().T) < 1e-2
    streams = [torch.cuda.Stream() for _ in range(4)]
    inputs = [(rand(4096, 4096), rand(64, 4096)) for _ in streams]
    results = []
    for s, (a, b) in zip(streams, inputs):
        with torch.cuda.stream(s):
            results.append(gb.matmul(a, b, transpose_b=True))
    torch.cuda.synchronize()
    for (a, b), result in zip(inputs, results):
        assert rel_err(result, a.double() @ b.double().T) < 1e-2
    assert len(launches) >= 6


def test_a_kernel_first_loaded_inside_a_global_capture(launches, monkeypatch):
    """A problem first met inside ``torch.cuda.graph`` (CUDA's global mode, no warm-up) with its kernel not loaded
    yet: the library is loaded inside the capture (``graphs.isolated``, relaxed) without failing, invalidating the
    capture or marking the kernel broken, and the kernel serves the replays."""
    monkeypatch.setattr(launch, "_kernels", {})
    monkeypatch.setattr(launch, "_ready", set())
    x, lora_a = rand(3000, 2048), rand(16, 2048)  # a shape no other test plans
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that could not be loaded warns
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = gb.matmul(x, lora_a, transpose_b=True)
    torch.cuda.current_stream().wait_stream(stream)
    assert launches and launch._kernels
    for _ in range(2):
        x.copy_(rand(3000, 2048))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, x.double() @ lora_a.double().T) < 1e-2


def test_cupy_and_jax_arrays(launches):
    cupy = pytest.importorskip("cupy")
    x = cupy.random.standard_normal((4096, 4096), dtype=cupy.float32).astype(cupy.float16)
    w = cupy.random.standard_normal((16, 4096), dtype=cupy.float32).astype(cupy.float16)
    result = gb.matmul(x, w, transpose_b=True)
    ref = x.astype(cupy.float64) @ w.astype(cupy.float64).T
    assert isinstance(result, cupy.ndarray) and float(cupy.linalg.norm(result - ref) / cupy.linalg.norm(ref)) < 1e-2
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jax sees no GPU")
    key = jax.random.PRNGKey(0)
    xj = jax.random.normal(key, (4096, 4096), dtype=jnp.bfloat16)
    wj = jax.random.normal(jax.random.PRNGKey(1), (16, 4096), dtype=jnp.bfloat16)
    result = gb.matmul(xj, wj, transpose_b=True)
    ref = xj.astype(jnp.float32) @ wj.astype(jnp.float32).T
    assert float(jnp.linalg.norm(result.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)) < 1e-2
    assert len(launches) == 2


def test_kernels_off_runs_cublaslt_and_auto_follows_the_rule(launches):
    x, lora_a = rand(4096, 4096), rand(16, 4096)
    gb.set_kernels("off")
    result = gb.matmul(x, lora_a, transpose_b=True)
    assert rel_err(result, x.double() @ lora_a.double().T) < 1e-2 and not launches
    gb.set_kernels("auto")
    gb.matmul(x, lora_a[:8], transpose_b=True)  # 8 wide, 32 MiB streamed: the kernel
    gb.matmul(x, lora_a, transpose_b=True)  # 16 wide: cuBLASLt
    assert len(launches) == 1
