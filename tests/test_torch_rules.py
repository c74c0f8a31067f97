"""PyTorch's rules, kept on every device: autograd is never bypassed, TF32 follows both of torch's APIs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import gemmbridge as gb  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def device_or_skip(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return device


@pytest.mark.parametrize("device", DEVICES)
def test_overwriting_a_tensor_saved_for_backward_fails_loudly(device):
    """out= bumps the version counter, as torch's own out= does: backward then refuses instead of using new data."""
    device = device_or_skip(device)
    w = torch.randn(4, 4, device=device, requires_grad=True)
    x = torch.randn(3, 4, device=device)
    y = torch.tanh(x @ w)  # tanh saves its output y for backward
    with torch.no_grad():
        gb.matmul(x, x.new_ones(4, 4), out=y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_inputs_that_require_grad_are_fine(device):
    device = device_or_skip(device)
    a = torch.randn(3, 4, device=device, requires_grad=True)
    b = torch.randn(4, 5, device=device)
    with torch.no_grad():
        result = gb.matmul(a, b)
    assert result.grad_fn is None and not result.requires_grad
    torch.testing.assert_close(result, (a @ b).detach())


@pytest.mark.parametrize("device", DEVICES)
def test_an_inference_tensor_out_inside_inference_mode(device):
    device = device_or_skip(device)
    with torch.inference_mode():
        a, b, out = (torch.randn(3, 4, device=device), torch.randn(4, 5, device=device),
                     torch.empty(3, 5, device=device))  # fmt: skip
        assert gb.matmul(a, b, out=out) is out
        torch.testing.assert_close(out, a @ b)


def _in_a_fresh_process(code: str) -> str:
    """Run ``code`` where no earlier test has touched torch's TF32 flags (once the new API is used,
    torch's legacy getter raises for the rest of the process)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tf32_policy_reads_torchs_new_api():
    out = _in_a_fresh_process("""
        import torch
        from gemmbridge.arrays.torch import tf32_policy
        print(tf32_policy())
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        try:
            torch._C._get_cublas_allow_tf32()
        except RuntimeError as error:
            print("legacy getter raises:", "mix of the legacy and new APIs" in str(error))
        print(tf32_policy())
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        print(tf32_policy())
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        print(tf32_policy())
    """)
    assert out.split("\n")[:5] == ["False", "legacy getter raises: True", "True", "False", "True"]


@pytest.mark.gpu
def test_float32_calls_work_after_torchs_new_tf32_api():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = _in_a_fresh_process("""
        import torch, gemmbridge as gb
        a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
        ref = a.double() @ b.double()
        err = lambda x: ((x.double() - ref).norm() / ref.norm()).item()
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        print(1e-5 < err(gb.matmul(a, b)) < 3e-3)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        print(err(gb.matmul(a, b)) < 1e-5)
    """)
    assert out.split() == ["True", "True"]


def test_a_cpu_call_leaves_the_tensors_storage_resizable():
    """Tensor.numpy() would mark the storage unresizable for good (FSDP2 frees unsharded parameters by resizing)."""
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    gb.matmul(a, b)
    a.untyped_storage().resize_(0)
    b.resize_(40)
