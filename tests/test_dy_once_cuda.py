"""The dy-once kernels on a GPU: g = s·dy·B and dB = s·dyᵀ·xa (+ C) against float64 for LoRA shapes, a float32 dB
accumulated in place, small odd shapes (memcheck runs those), and replays of a captured CUDA graph."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("needs a CUDA GPU of compute capability 9.0 or later", allow_module_level=True)

from gemmbridge.backends.cuda.kernels import lora  # noqa: E402
from gemmbridge.problem import Operands, TensorMeta, describe  # noqa: E402

pytestmark = pytest.mark.gpu


def meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."), f"cuda:{t.device.index}")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


class Case:
    """dy, B, xa of one shape, the outputs poisoned, and the DyOnce serving them (with its workspace)."""

    def __init__(self, t: int, o: int, r: int, dtype: torch.dtype, db_dtype: torch.dtype | None = None,
                 accumulate: bool = False) -> None:  # fmt: skip
        self.dy, self.b, self.xa = (torch.randn(*shape, device="cuda").to(dtype) for shape in ((t, o), (o, r), (t, r)))
        self.g = torch.full((t, r), float("nan"), dtype=dtype, device="cuda")
        self.db = torch.randn(o, r, device="cuda").to(db_dtype or dtype)
        if not accumulate:
            self.db.fill_(float("nan"))
        self.before = self.db.double()
        self.accumulate = accumulate
        c, out_dtype = meta(self.db) if accumulate else None, "float32" if db_dtype == torch.float32 else None
        db = describe(meta(self.dy), meta(self.xa), transpose_a=True, c=c, out=meta(self.db), out_dtype=out_dtype)
        self.gemm = lora.DyOnce(describe(meta(self.dy), meta(self.b), out=meta(self.g)), db, 0)
        self.workspace = torch.empty(self.gemm.workspace_bytes, dtype=torch.uint8, device="cuda")

    def launch(self, s: float) -> None:
        ptr = {name: getattr(self, name).data_ptr() for name in ("dy", "b", "xa", "g", "db")}
        self.gemm.launch(Operands(ptr["dy"], ptr["b"], 0, ptr["g"]),
                         Operands(ptr["dy"], ptr["xa"], ptr["db"] if self.accumulate else 0, ptr["db"]), s, s,
                         1.0 if self.accumulate else 0.0, self.workspace.data_ptr(),
                         torch.cuda.current_stream().cuda_stream)  # fmt: skip

    def check(self, s: float) -> None:
        torch.cuda.synchronize()
        dy = self.dy.double()
        assert rel_err(self.g, s * dy @ self.b.double()) < 1e-2
        assert rel_err(self.db, s * dy.T @ self.xa.double() + (self.before if self.accumulate else 0)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [4096, 1000])
@pytest.mark.parametrize("o, r", [(4096, 8), (4096, 16), (4096, 32), (11008, 16)])
def test_both_products_match_float64(dtype, t, o, r):
    case = Case(t, o, r, dtype)
    case.launch(0.5)
    case.check(0.5)


def test_a_float32_db_accumulated_in_place():
    case = Case(4096, 4096, 16, torch.bfloat16, torch.float32, accumulate=True)
    case.launch(2.0)
    case.check(2.0)


def test_small_odd_shapes():
    """T = 200 (two row tiles, the second cut), O = 520 (the last three blocks of the cluster past O), rank 8."""
    for accumulate in (False, True):
        case = Case(200, 520, 8, torch.bfloat16, torch.float32, accumulate=accumulate)
        case.launch(1.5)
        case.check(1.5)


def test_replays_of_a_captured_graph():
    case = Case(4096, 4096, 16, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        case.launch(1.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            case.launch(1.0)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        case.dy.copy_(torch.randn_like(case.dy, dtype=torch.float32))
        case.g.fill_(float("nan"))
        case.db.fill_(float("nan"))
        graph.replay()
        case.check(1.0)
