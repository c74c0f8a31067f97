"""A LoRA layer's two backward GEMMs that read ``dy`` (T × O), from one read of it (``dyonce.cu``):
``g = alpha_g · dy·B`` (T × r) and ``dB = alpha_dB · dyᵀ·xa + beta_dB · C`` (O × r).

``DyOnce(problem_g, problem_db, device)`` takes the two problems as ``gemmbridge.problem.describe`` makes them
(``describe(dy, B)`` and ``describe(dy, xa, transpose_a=True[, c=, out_dtype=])``), checks that they share ``dy`` and
that the kernel serves them, and launches the main kernel (clusters of 8 blocks along O, ``P`` clusters along T,
``dB``'s partial sums per cluster in a float32 workspace of ``workspace_bytes``) and the reduction of the partials.
docs/kernels.md, "dy read once".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ....errors import BackendUnavailableError, OptionError
from ....problem import Operands, Problem
from .. import kernels
from . import launch
from .config import HALF, SMEM_LIMIT

CLUSTER, ROWS, SLICE, THREADS = 8, 128, 128, 256  # dyonce.cu's CLUSTER, BT, BK, THREADS
RANKS = (8, 16, 32)
MAX_ACCUMULATORS = 96  # floats per thread for dB's and g's partial sums (no spills on sm_90 up to 88)


@dataclass(frozen=True, slots=True)
class DyOnceConfig:
    """The compile-time shape of the dy-once kernels (``dyonce.cu``'s macros); ``reduce``: the second kernel."""

    source_file: ClassVar[str] = "dyonce.cu"
    threads: ClassVar[int] = THREADS

    dtype: str  # of dy, B, xa and g
    out_f32: bool  # dB and C in float32
    rank: int
    slices: int  # dy columns per block, in slices of SLICE
    stages: int
    reduce: bool = False

    @property
    def kernel_name(self) -> bytes:
        return b"gemmbridge_dyonce_reduce" if self.reduce else b"gemmbridge_dyonce"

    @property
    def name(self) -> str:
        out = "f32" if self.out_f32 else ""
        return f"dyonce-{self.dtype}{out}-r{self.rank}-o{self.slices}x{SLICE}-s{self.stages}" + "-reduce" * self.reduce

    @property
    def smem_bytes(self) -> int:
        """The g partial (fp32), the pipeline's dy slices, two xa tiles and the block's rows of B."""
        if self.reduce:
            return 0
        small = self.rank + 8
        return 4 * ROWS * (self.rank + 4) + 2 * (self.stages * ROWS * (SLICE + 8) + 2 * ROWS * small + self.slices *
                                                 SLICE * small)  # fmt: skip

    @property
    def valid(self) -> bool:
        """A rank the fragments cover, accumulators within the register budget, a pipeline that never runs more than
        one row tile ahead (two xa tiles), shared memory that fits."""
        registers = (self.slices + 1) * self.rank // 2 <= MAX_ACCUMULATORS
        pipeline = self.slices >= 1 and 2 <= self.stages <= self.slices + 1
        return self.dtype in HALF and self.rank in RANKS and registers and pipeline and self.smem_bytes <= SMEM_LIMIT

    def defines(self) -> dict[str, int]:
        return {"HALF_BF16": int(self.dtype == "bfloat16"), "OUT_F32": int(self.out_f32), "R": self.rank,
                "SLICES": self.slices, "STAGES": self.stages}  # fmt: skip


def configure(problem_g: Problem, problem_db: Problem) -> DyOnceConfig | None:
    """The configuration for ``g = dy·B`` and ``dB = dyᵀ·xa`` as described, or None when the kernels cannot serve
    them: half inputs, g in their dtype, one matrix each (no batch, no bias, no epilogue), dy, B, xa, g, C and dB all
    row-major with 16-byte aligned rows, the same dy (T × O) in both, O a multiple of 8, a rank of 8, 16 or 32."""
    g, db = problem_g, problem_db
    for p in (g, db):
        if p.dtype not in HALF or p.epilogue != "none" or p.has_bias or p.copies or p.empty or p.out_via_temp:
            return None
        if p.batch_count != 1 or len(p.outer_offsets) != 1 or any(m.alignment < 16 for m in p.matrices[:4]):
            return None
    dy_g, b, _, out_g = g.matrices[:4]
    dy_db, xa, c_db, out_db = db.matrices[:4]
    if g.result_dtype != g.dtype or db.dtype != g.dtype or g.byte_extents.c is not None or not c_db.row_major:
        return None  # g takes no C
    shared = (dy_g.row_major and not dy_db.row_major and dy_g.ld == dy_db.ld and g.m == db.k and g.k == db.m
              and g.n == db.n)  # fmt: skip
    if not (shared and b.row_major and xa.row_major and out_g.row_major and out_db.row_major and g.k % 8 == 0):
        return None
    slices = -(-g.k // (CLUSTER * SLICE))
    config = DyOnceConfig(g.dtype, db.result_dtype == "float32", g.n, slices, min(3, slices + 1))
    return config if config.valid else None


class DyOnce:
    """``g = alpha_g · dy·B`` and ``dB = alpha_dB · dyᵀ·xa + beta_dB · C`` with one read of dy. Raises OptionError
    when the kernels cannot serve the two problems, BackendUnavailableError when they cannot run here (a GPU below
    compute capability 9.0, kernels "off", no NVRTC): then two GEMMs serve."""

    def __init__(self, problem_g: Problem, problem_db: Problem, device: int) -> None:
        found = kernels.usable(device)
        if found is None:
            raise BackendUnavailableError(
                f"dy once: the kernels need a GPU of compute capability 9.0 or later and kernels not 'off' "
                f"(cuda:{device}, kernels {kernels.mode!r})"
            )
        config = configure(problem_g, problem_db)
        t, o, r = problem_g.m, problem_g.k, problem_g.n
        text = f"{problem_g.dtype} dy {t}×{o}, rank {r}, dB {problem_db.result_dtype} on {problem_g.device}"
        if config is None:
            raise OptionError(
                f"dy once: the kernels cannot serve {text}: they need bf16 or fp16 inputs, one matrix each, row-major "
                "16-byte aligned rows, the same dy in both problems, g in the inputs' dtype, O a multiple of 8, a rank "
                f"of {', '.join(map(str, RANKS))} and at most {MAX_ACCUMULATORS * 2 // r - 1} slices of {SLICE} "
                "columns per block"
            )
        with kernels.loading(f"dy once: {config.name}"):
            main = int(launch.kernel(config, device, found[1]))
            second = int(launch.kernel(dataclasses.replace(config, reduce=True), device, found[1]))
        self.config, self.what = config, f"the dy-once kernels for {text}"
        self.clusters = min(max(1, found[2] // CLUSTER), -(-t // ROWS))
        self.workspace_bytes = self.clusters * o * r * 4
        a, b, d = problem_g.matrices.a, problem_g.matrices.b, problem_g.matrices.d
        xa, c, db = problem_db.matrices.b, problem_db.matrices.c, problem_db.matrices.d
        self._main = launch.Launch(main, (CLUSTER, self.clusters, 1), THREADS, config.smem_bytes, found[1], self.what)
        self._main_block = np.array([0, 0, 0, 0, 0, a.ld, b.ld, xa.ld, d.ld, t, o, self.clusters, 0], dtype=np.int64)
        self._second = launch.Launch(second, (min(-(-o * r // 8 // THREADS), 4 * found[2]), 1, 1), THREADS, 0,
                                     found[1], self.what)  # fmt: skip
        self._second_block = np.array([0, 0, 0, c.ld, db.ld, o, self.clusters, 0, 0], dtype=np.int64)

    def launch(self, g: Operands, db: Operands, alpha_g: float, alpha_db: float, beta_db: float, workspace: int,
               stream: int) -> None:  # fmt: skip
        """Enqueue both kernels on ``stream``. ``g``: device addresses of dy (a), B (b) and g (d); ``db``: of dy (a,
        the same), xa (b), C (c, read when beta_dB ≠ 0; it may be dB itself) and dB (d); ``workspace``: at least
        ``workspace_bytes`` of device memory the stream owns until the second kernel has run."""
        misaligned = (g.a | g.b | g.d | db.b | db.c | db.d | workspace) & 15
        if misaligned or g.a != db.a or not workspace or (beta_db and not db.c):
            raise OptionError(f"dy once: {self.what} needs 16-byte aligned pointers, the same dy in both problems, a "
                              f"workspace and C when beta ≠ 0 (dy {g.a:#x} and {db.a:#x}, B {g.b:#x}, g {g.d:#x}, xa "
                              f"{db.b:#x}, C {db.c:#x}, dB {db.d:#x}, workspace {workspace:#x})")  # fmt: skip
        main = self._main_block.copy()
        main[:5] = (g.a, g.b, db.b, g.d, workspace)
        main.view(np.float64)[12] = alpha_g
        second = self._second_block.copy()
        second[:3] = (workspace, db.c, db.d)
        second.view(np.float64)[7:9] = (alpha_db, beta_db)
        params = np.array([main.ctypes.data, second.ctypes.data], dtype=np.uint64)
        self._main(stream, params.ctypes.data)
        self._second(stream, params.ctypes.data + 8)
