"""Which problems the skinny kernel serves, and with which tile. Pure Python: checked in CI.

A problem is *skinny* when one side of its result is at most ``SKINNY``: its bytes, not its flops, set its
time. Two shapes of tile serve it (``configure``; from a sweep of every valid configuration on an H200,
``docs/kernels.md``):

- ``n`` small (``x·Aᵀ``, ``dy·B``, ``dyᵀ·xa``): 64 × N tiles streaming the M × K operand in K slices of up to
  256, K split over a cluster of up to 8 blocks when the tiles alone would leave SMs idle;
- ``m`` small (``dyBᵀ·x``, decode ``x·Wᵀ``): M × 64 tiles streaming the K × N operand, K split the same way.

A write-bound problem (only K small: ``xa·Bᵀ``) gets no tile. The kernel needs 16-byte aligned operands
(``eligible``); anything else stays on cuBLASLt. ``choose`` is the measured rule of when the kernel wins.
``masked`` tiles the GEMMs with dropout inside (``dropout.py``), the write-bound product ``g·A`` included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ....problem import Problem

SKINNY = 128
HALF = ("bfloat16", "float16")
MAX_SPLITS = 8  # the portable cluster size
MAX_GRID_YZ = 65535  # blocks along a grid's y (M tiles) and z (batch x splits)
MIN_SPLIT_TILES = 4  # each split of K gets at least this many BK slices
SMEM_LIMIT = 227 * 1024  # dynamic shared memory a block may opt into on sm_90
AUTO_MAX_STREAMED = 48 * 2**20  # the kernel beat cuBLASLt at 32 MiB streamed and lost at 112 and 128 (H200)
AUTO_MAX_NARROW = 8  # ... with a result 8 wide (or 8 tall) or less; tied or lost at 16, lost at 64
MASKS = {"": 0, "a": 1, "b": 2, "d": 3}  # Config.mask → skinny.cu's MASK: none, on A, on B, on the product


@dataclass(frozen=True, slots=True)
class Config:
    """The compile-time shape of one kernel (the macros of ``skinny.cu``) and its split of K."""

    source_file: ClassVar[str] = "skinny.cu"
    kernel_name: ClassVar[bytes] = b"gemmbridge_skinny"

    dtype: str  # of A and B
    out_f32: bool  # D, C and bias in float32
    a_kcontig: bool  # A(m, k) at a[m * lda + k]; else at a[k * lda + m]
    b_kcontig: bool  # B(k, n) at b[n * ldb + k]; else at b[k * ldb + n]
    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    stages: int
    splits: int
    mask: str = ""  # dropout (dropout.py): "" none, "a" on A (K-contiguous), "b" on B (N-contiguous), "d" the product

    @property
    def threads(self) -> int:
        return 32 * self.wm * self.wn

    @property
    def smem_bytes(self) -> int:
        """The pipeline's stages, or the fp32 tile of the epilogue, whichever is larger."""
        a_stage = self.bm * (self.bk + 8) if self.a_kcontig else self.bk * (self.bm + 8)
        b_stage = self.bn * (self.bk + 8) if self.b_kcontig else self.bk * (self.bn + 8)
        staged_f32 = self.splits > 1 or self.mask == "d"
        tile = 4 * self.bm * (self.bn + 4) if staged_f32 else (4 if self.out_f32 else 2) * self.bm * (self.bn + 8)
        return max(2 * self.stages * (a_stage + b_stage), tile)

    @property
    def valid(self) -> bool:
        """Sound values (a cached payload may hold any), the tile divided among the warps in 16 x 16 pieces and
        each operand's 16-byte pieces among the threads (``skinny.cu``'s ``Loader``), a pipeline of at least two
        stages, a portable cluster, shared memory that fits, and a masked operand (dropout) that is contiguous along
        its rows."""
        ints = (self.bm, self.bn, self.bk, self.wm, self.wn, self.stages, self.splits)
        if not all(type(v) is int and v > 0 for v in ints) or self.dtype not in HALF:
            return False
        if not (
            isinstance(self.out_f32, bool) and isinstance(self.a_kcontig, bool) and isinstance(self.b_kcontig, bool)
        ):
            return False
        if self.stages < 2 or self.splits > MAX_SPLITS or self.bk < 16:
            return False
        if self.mask not in MASKS or (self.mask == "a" and not self.a_kcontig) or (self.mask == "b" and self.b_kcontig):
            return False
        pieces = [(self.bm, self.bk) if self.a_kcontig else (self.bk, self.bm),
                  (self.bn, self.bk) if self.b_kcontig else (self.bk, self.bn)]  # fmt: skip
        spread = all(rows * cols // 8 <= self.threads or (rows * cols // 8 % self.threads == 0
                     and self.threads % (cols // 8) == 0) for rows, cols in pieces)  # fmt: skip
        return (self.bm % (16 * self.wm) == 0 and self.bn % (16 * self.wn) == 0 and self.bk % 16 == 0 and spread
                and self.smem_bytes <= SMEM_LIMIT)  # fmt: skip

    def defines(self) -> dict[str, int]:
        return {
            "HALF_BF16": int(self.dtype == "bfloat16"),
            "OUT_F32": int(self.out_f32),
            "A_KCONTIG": int(self.a_kcontig),
            "B_KCONTIG": int(self.b_kcontig),
            "BM": self.bm,
            "BN": self.bn,
            "BK": self.bk,
            "WM": self.wm,
            "WN": self.wn,
            "STAGES": self.stages,
            "SPLITS": self.splits,
            "MASK": MASKS[self.mask],
        }

    @property
    def name(self) -> str:
        """A short stable name: dtype, operand orders, tile, split and mask (cache keys, benchmark reports)."""
        order = ("k" if self.a_kcontig else "m") + ("k" if self.b_kcontig else "n")
        out = "f32" if self.out_f32 else ""
        tile = f"{self.bm}x{self.bn}x{self.bk}-w{self.wm}x{self.wn}-s{self.stages}"
        return f"{self.dtype}{out}-{order}-{tile}-k{self.splits}" + (f"-drop{self.mask}" if self.mask else "")


def _tile(x: int) -> int:
    """The power of two from 16 up that covers ``x`` (the loader spreads a tile's rows of 16-byte pieces evenly)."""
    return max(16, 1 << (x - 1).bit_length())


def _splits(tiles: int, k: int, bk: int, sms: int) -> int:
    """The largest power of two (≤ 8) that keeps the blocks within one per SM, and MIN_SPLIT_TILES per split."""
    splits = 1
    while splits < MAX_SPLITS and tiles * splits * 2 <= sms and k >= 2 * splits * MIN_SPLIT_TILES * bk:
        splits *= 2
    return splits


def _fitted(config: Config, deepest: int) -> Config | None:
    """``config`` with the deepest K slice (at most ``deepest``) and pipeline that fits in shared memory."""
    for bk, stages in ((256, 4), (256, 3), (128, 4), (128, 3), (64, 4), (64, 3)):
        if bk > deepest:
            continue
        found = replace(config, bk=bk, stages=stages)
        if found.valid:
            return found
    return None


def eligible(problem: Problem) -> bool:
    """The problem has a layout and epilogue the skinny kernel serves (``skinny.cu``'s requirements)."""
    if problem.dtype not in HALF or problem.result_dtype not in (problem.dtype, "float32"):
        return False
    if problem.epilogue != "none" or problem.empty or problem.k == 0:
        return False
    a, b, c, d = problem.matrices[:4]
    if not d.row_major or (problem.copies and "c" in problem.copies) or not c.row_major:
        return False
    if any(x.alignment < 16 for x in (a, b, c, d)):
        return False
    m, n, k = problem.m, problem.n, problem.k
    a_extent = k if a.row_major else m
    b_extent = n if b.row_major else k
    return a_extent % 8 == 0 and b_extent % 8 == 0 and n % 8 == 0


def configure(problem: Problem, sms: int) -> Config | None:
    """The kernel's tile for a problem with a narrow result (N ≤ SKINNY, the M x K operand streamed) or a short one
    (M ≤ SKINNY, the K x N operand streamed), or None. A write-bound problem (only K small) gets none: the kernel
    measured 0.42–0.63× cuBLASLt on it (``docs/kernels.md``)."""
    m, n, k = problem.m, problem.n, problem.k
    if min(m, n) > SKINNY or not eligible(problem):
        return None
    a, b = problem.matrices.a, problem.matrices.b
    base = Config(problem.dtype, problem.result_dtype == "float32", a.row_major, not b.row_major, 0, 0, 0, 0, 0, 0, 1)
    if n <= SKINNY and n <= m:  # a tall, narrow result
        config = _fitted(replace(base, bm=64, bn=_tile(n), wm=4, wn=1), 256)
        tiles = -(-m // 64)
    else:  # a short, wide result
        config = _fitted(replace(base, bm=_tile(m), bn=64, wm=1, wn=4), 128)
        tiles = -(-n // 64)
    if config is None:
        return None
    config = replace(config, splits=_splits(tiles * problem.batch_count, k, config.bk, sms))
    return config if fits_grid(problem, config) else None


def fits_grid(problem: Problem, config: Config) -> bool:
    """The launch's grid is within the hardware's limits (y: the M tiles; z: the batch times the splits of K)."""
    return -(-problem.m // config.bm) <= MAX_GRID_YZ and problem.batch_count * config.splits <= MAX_GRID_YZ


def streamed(problem: Problem, config: Config) -> tuple[int, int]:
    """Bytes of the operand the kernel streams (the M x K one for a narrow result, else the K x N one), and the
    result's narrow side (N, else M)."""
    count = problem.batch_count * len(problem.outer_offsets) * problem.itemsize * problem.k
    if config.bn >= problem.n and problem.n <= problem.m:
        return count * problem.m, problem.n
    return count * problem.n, problem.m


def choose(problem: Problem, sms: int) -> Config | None:
    """The measured rule (an H200, steady state, ``docs/kernels.md``): the kernel where it beat cuBLASLt — a result
    at most ``AUTO_MAX_NARROW`` wide (or tall) and a streamed operand of at most ``AUTO_MAX_STREAMED`` bytes
    (0.98–1.18×); None (cuBLASLt) elsewhere, unless the tuner measured otherwise."""
    config = configure(problem, sms)
    if config is None:
        return None
    size, narrow = streamed(problem, config)
    return config if narrow <= AUTO_MAX_NARROW and size <= AUTO_MAX_STREAMED else None


def candidates(problem: Problem, sms: int) -> list[Config]:
    """``configure``'s configuration and its neighbours in the split of K, for the tuner to time."""
    config = configure(problem, sms)
    if config is None:
        return []
    found = [config]
    if config.splits > 1:
        found.append(replace(config, splits=config.splits // 2))
    if config.splits < MAX_SPLITS and problem.k >= 2 * config.splits * config.bk:
        found.append(replace(config, splits=config.splits * 2))
    return [c for c in found if fits_grid(problem, c)]


def masked(problem: Problem, sms: int, role: str) -> Config | None:
    """The tile of a GEMM with dropout inside (``dropout.py``), or None when the kernel cannot serve it: one matrix
    (no batch) with a layout ``eligible`` takes; role "a" (``x·Aᵀ``) and "b" (``gᵀ·x``) ``configure``'s tile
    with more warps an SM (``_more_warps``), x (the masked operand) row-major; role "d" (the product ``g·A``
    masked) a write-bound tile: ``BM × BN`` = 64 × 128 in 4 warps, K (the rank) in slices of up to 64, the fp32 tile
    staged in shared memory for the mask."""
    if role not in MASKS or not role or problem.batch_count != 1 or len(problem.outer_offsets) != 1:
        return None
    if not eligible(problem):
        return None
    if role == "d":
        a, b = problem.matrices.a, problem.matrices.b
        tile = Config(problem.dtype, problem.result_dtype == "float32", a.row_major, not b.row_major, 64, 128,
                      min(64, _tile(problem.k)), 2, 2, 2, 1, "d")  # fmt: skip
        config: Config | None = tile if tile.valid else None
    else:
        found = configure(problem, sms)
        config = None if found is None else replace(found, mask=role)
        if config is not None and (role == "b" or config.splits == 1):
            config = _more_warps(problem, config, 2 if role == "b" else 1)
    return config if config is not None and config.valid and fits_grid(problem, config) else None


def _more_warps(problem: Problem, config: Config, times: int) -> Config:
    """``config`` with the K slice halved and the split doubled, ``times`` over as far as each step gives a valid tile
    with ``MIN_SPLIT_TILES`` slices per split: smaller blocks, more of them an SM, more warps to hide the latency of
    drawing the mask (Philox). Role "b" (``gᵀ·x``) gets it twice, role "a" (``x·Aᵀ``) once where ``configure`` splits
    nothing (at T 4096, where it splits K already, more splits ran slower): docs/kernels.md, "Dropout"."""
    for _ in range(times):
        halved = replace(config, bk=config.bk // 2, splits=config.splits * 2)
        enough = problem.k >= halved.splits * MIN_SPLIT_TILES * halved.bk
        if halved.splits > MAX_SPLITS or not enough or not halved.valid or not fits_grid(problem, halved):
            break
        config = halved
    return config
