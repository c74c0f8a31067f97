"""Programmatic dependent launch on a GPU: a LoRA layer's skinny GEMMs back to back (the lane's own kernels: masked
x·Aᵀ → cuBLASLt's xa·Bᵀ → dy once and its reduction → masked gᵀ·x → masked g·A; ``benchmarks/lora_sequence.py``'s
sequence) give, with PDL, the serial launches' outputs bit for bit and float64's, each output poisoned first — eager,
with dB accumulated in place, and in a captured CUDA graph replayed with fresh data — and the layer itself
(``lora_linear``'s forward and backward) gives the same gradients with PDL as without."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("needs a CUDA GPU of compute capability 9.0 or later", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lora_sequence as sequence  # noqa: E402

import gemmbridge as gb  # noqa: E402
from gemmbridge.backends.cuda.kernels import launch  # noqa: E402
from gemmbridge.torch import lora_kernels, lora_linear  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def kernels_on():
    """The lane's own kernels wherever they serve (dy once runs only under "on")."""
    gb.set_kernels("on")
    yield
    gb.set_kernels("auto")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def run_both(step: sequence.Step, p: float, accumulate: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The sequence with PDL and without, each on poisoned outputs (dB reset to its value before, when accumulated),
    the seed fixed; each checked against float64."""
    before = step.dB.clone()
    found = {}
    for on in (True, False):
        step.poison()
        if accumulate:
            step.dB.copy_(before)
        sequence.with_pdl(sequence.gemmbridge_sequence(step, p, accumulate, draw=False), on)(step)
        torch.cuda.synchronize()
        refs = step.reference(p, before if accumulate else None)
        for name, ref in refs.items():
            assert rel_err(step.output(name), ref) < 1e-2, (on, name, rel_err(step.output(name), ref))
        found[f"PDL {on}"] = step.snapshot()
    return found


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("t, d, db_dtype", [(4096, 4096, torch.bfloat16), (1000, 4096, torch.float32)])
def test_the_sequence_with_pdl_is_the_serial_one_bit_for_bit(p, t, d, db_dtype):
    step = sequence.Step(t, 16, d, db_dtype)
    step.seed.fill_(-123456789)
    found = run_both(step, p, accumulate=db_dtype == torch.float32)
    for name in sequence.OUTPUTS:
        assert torch.equal(found["PDL True"][name], found["PDL False"][name]), name


def test_small_odd_shapes():
    """Tiles cut by the edges (racecheck and synccheck run this): T = 200, d = 520, dropout and dB accumulated."""
    step = sequence.Step(200, 16, 520, torch.float32)
    step.seed.fill_(77)
    found = run_both(step, 0.3, accumulate=True)
    for name in sequence.OUTPUTS:
        assert torch.equal(found["PDL True"][name], found["PDL False"][name]), name


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_a_captured_graph_with_pdl_replays_with_fresh_data(p):
    """The sequence captured with PDL (the seed drawn inside the graph), replayed three times on fresh inputs with
    poisoned outputs: each replay matches float64 and the serial eager run on the same inputs and seed."""
    step = sequence.Step(2048)
    lane = sequence.with_pdl(sequence.gemmbridge_sequence(step, p), True)
    serial = sequence.with_pdl(sequence.gemmbridge_sequence(step, p, draw=False), False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lane(step)  # compile, load and plan outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            lane(step)
    torch.cuda.current_stream().wait_stream(side)
    seeds = set()
    for _ in range(3):
        for x in (step.x, step.dy, step.A, step.B):
            x.copy_(torch.randn(x.shape, device="cuda"))
        step.poison()
        graph.replay()
        torch.cuda.synchronize()
        seeds.add(int(step.seed.item()))
        for name, ref in step.reference(p).items():
            assert rel_err(step.output(name), ref) < 1e-2, name
        replayed = step.snapshot()
        step.poison()
        serial(step)
        torch.cuda.synchronize()
        for name in sequence.OUTPUTS:
            assert torch.equal(step.output(name), replayed[name]), name
    assert len(seeds) == (3 if p else 1)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_lora_layer_gives_the_same_values_and_gradients_with_and_without_pdl(dropout):
    """``lora_linear`` forward and backward (the frozen GEMMs on cuBLASLt between the lane's kernels), the dropout
    seed drawn from the same torch seed: PDL changes no bit of y, dx, dA, dB; float64 agrees."""
    t, d, r, scale = 2048, 4096, 16, 2.0
    x, w, dy = (torch.randn(*shape, device="cuda").bfloat16() for shape in ((t, d), (d, d), (t, d)))
    adapters = [torch.randn(r, d, device="cuda").bfloat16() / 8, torch.randn(d, r, device="cuda").bfloat16() / 8]
    found = {}
    for on in (True, False):
        launch.pdl, before = on, launch.pdl
        try:
            torch.manual_seed(1234)
            leaves = [v.clone().requires_grad_() for v in (x, *adapters)]
            y = lora_linear(leaves[0], w, None, leaves[1], leaves[2], scale=scale, dropout=dropout)
            y.backward(dy)
            found[on] = [y.detach(), *(v.grad for v in leaves)]
        finally:
            launch.pdl = before
    for mine, serial in zip(found[True], found[False]):
        assert torch.equal(mine, serial)
    torch.manual_seed(1234)
    keep = 1.0 - dropout
    mask = 1.0
    if dropout:
        from gemmbridge.backends.cuda.kernels import dropout as masks

        value = int(lora_kernels.seed_for(x).item())
        mask = torch.from_numpy(masks.mask(value, t, d, keep)).cuda().double()
        keep = masks.effective_keep(keep)
    xd, a, b, wd, dyd = (v.double() for v in (x, *adapters, w, dy))
    xm = xd * mask / keep
    y_ref = xd @ wd.T + scale * (xm @ a.T) @ b.T
    g = scale * dyd @ b
    refs = [y_ref, dyd @ wd + (g @ a) * mask / keep, g.T @ xm, scale * dyd.T @ (xm @ a.T)]
    for value, ref in zip(found[True], refs):
        assert rel_err(value, ref) < 2e-2
