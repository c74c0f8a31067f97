"""Dropout inside the skinny kernel (``skinny.cu``'s MASK): the mask regenerated wherever x is read, never stored.

The mask (``philox.cuh``): element (i, j) of x, a row-major rows × cols matrix, has index ``i·cols + j`` and is
kept iff ``h / 2¹⁶ < keep``, where h is the 16-bit half ``index mod 2`` (the low one first) of word
``(index mod 8) div 2`` of Philox4x32-10 with counter ``index div 8`` (words lo, hi, 0, 0) and key the 64-bit seed
(words lo, hi). One Philox call covers a 16-byte piece of a half-precision row, and the keep probability is honoured
to 2⁻¹⁶ (``effective_keep``). The kernel reads the seed from device memory: a caller that draws it on the stream
with its framework's generator (a one-element ``torch.randint``) gets a fresh mask in every CUDA-graph replay and
under ``torch.compile``, and its backward passes the same seed to regenerate the same mask.

A LoRA layer's three GEMMs with dropout (x is T × d, A r × d, g = dy·B T × r), the ``masked`` roles of
``MaskedGemm``:

- ``"a"``: ``xa = (1/keep)·(x ⊙ m)·Aᵀ`` — x is op(a), masked as it is loaded;
- ``"b"``: ``dA = (s/keep)·gᵀ·(x ⊙ m)`` — x is op(b), masked as it is loaded;
- ``"d"``: ``t = (s/keep)·(g·A) ⊙ m + beta·C`` — the product masked before alpha and beta.

``mask`` is the NumPy reference of the mask, ``fill_mask`` the device's mask as bytes. docs/kernels.md, "Dropout".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ....errors import BackendUnavailableError, OptionError
from ....problem import Operands, Problem
from .. import kernels
from . import launch
from .config import masked as masked_tile

ROLES = ("a", "b", "d")
RESOLUTION = 1 << 16  # the uniform's steps: h / 2¹⁶
_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's multipliers
_W = (0x9E3779B9, 0xBB67AE85)  # and its key schedule's increments (Random123)
_WORD = np.uint64(0xFFFFFFFF)
_ROLE_TEXT = {"a": "op(a) = x", "b": "op(b) = x", "d": "the product"}


def threshold(keep: float) -> int:
    """``ceil(keep · 2¹⁶)``: an element is kept iff its 16-bit h is below it; ``keep`` in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise OptionError(f"dropout: keep must be a probability in (0, 1], not {keep!r}")
    return math.ceil(keep * RESOLUTION)


def effective_keep(keep: float) -> float:
    """The probability the mask keeps an element with: ``keep`` rounded up to a multiple of 2⁻¹⁶ (for an exactly
    unbiased expectation scale by ``1 / effective_keep(keep)``; ``1 / keep`` is off by less than 2⁻¹⁶ / keep)."""
    return threshold(keep) / RESOLUTION


def philox4x32_10(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of each row of ``counters`` (n × 4 uint32 words) under ``key`` (two uint32 words): n × 4 uint32."""
    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1 = np.uint64(_M[0]), np.uint64(_M[1])
    for _ in range(10):
        p0, p1 = c[0] * m0, c[2] * m1
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _WORD, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _WORD]
        k0, k1 = (k0 + np.uint64(_W[0])) & _WORD, (k1 + np.uint64(_W[1])) & _WORD
    return np.stack(c, axis=1).astype(np.uint32)


def mask(seed: int, rows: int, cols: int, keep: float) -> np.ndarray:
    """The mask of a rows × cols x under ``seed`` (its 64 bits; a negative int64 as its two's complement): True where
    the element is kept."""
    limit = threshold(keep)
    count = rows * cols
    groups = np.arange(-(-count // 8), dtype=np.uint64)
    counters = np.zeros((groups.size, 4), np.uint32)
    counters[:, 0], counters[:, 1] = groups & _WORD, groups >> np.uint64(32)
    seed &= (1 << 64) - 1
    words = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32))
    halves = words.astype("<u4").view("<u2").reshape(-1)[:count]  # element order: each word's low half first
    return (halves < limit).reshape(rows, cols)


class MaskedGemm:
    """``D = alpha · op(a) @ op(b) + beta · C + bias`` on the skinny kernel with the dropout mask of x inside, x being
    op(a) (``masked="a"``), op(b) (``"b"``) or the M × N product (``"d"``: ``D = alpha · (op(a) @ op(b)) ⊙ m + beta ·
    C + bias``). ``problem``: a ``gemmbridge.problem.describe`` of one matrix product (bf16 or fp16, no batch, the
    layouts of ``config.eligible``, x row-major). Raises OptionError when the kernel cannot serve it in that role,
    BackendUnavailableError when the kernel cannot run here (a GPU below compute capability 9.0, kernels "off", no
    NVRTC): then the unfused path serves."""

    def __init__(self, problem: Problem, device: int, masked: str, keep: float) -> None:
        self.threshold = threshold(keep)
        if masked not in ROLES:
            raise OptionError(f"dropout: masked must be one of {ROLES}, not {masked!r}")
        found = kernels.usable(device)
        if found is None:
            raise BackendUnavailableError(
                f"dropout: the skinny kernel needs a GPU of compute capability 9.0 or later and kernels not 'off' "
                f"(cuda:{device}, kernels {kernels.mode!r})"
            )
        text = f"{problem.dtype}→{problem.result_dtype} m={problem.m} n={problem.n} k={problem.k} on {problem.device}"
        config = masked_tile(problem, found[2], masked)
        if config is None:
            raise OptionError(
                f"dropout: the skinny kernel cannot serve {text} (batch {problem.batch_shape}) with the mask on "
                f"{_ROLE_TEXT[masked]}: it needs bf16 or fp16 inputs, one matrix, 16-byte aligned rows, x "
                "row-major and, for a mask on an operand, a result at most 128 wide or tall"
            )
        with kernels.loading(f"dropout: the skinny kernel {config.name}"):
            self.plan = launch.KernelPlan(problem, config, device, found[1], f"{text} with dropout", self.threshold)
        self.config = config

    def launch(self, ptrs: Operands, alpha: float, beta: float, seed_ptr: int, stream: int) -> None:
        """Enqueue the product on ``stream``; ``ptrs``: device addresses (a, b, c, d, bias; c read when beta ≠ 0,
        ``c == d`` accumulates in place), ``seed_ptr``: the address of the 64-bit seed."""
        misaligned = (ptrs.a | ptrs.b | ptrs.c | ptrs.d | ptrs.bias) & 15 or seed_ptr & 7
        if misaligned or not seed_ptr or (beta and not ptrs.c):
            raise OptionError(f"dropout: {self.plan.what} needs 16-byte aligned a, b, c, d, bias, an 8-byte aligned "
                              f"seed and c when beta ≠ 0 (a {ptrs.a:#x}, b {ptrs.b:#x}, c {ptrs.c:#x}, d {ptrs.d:#x}, "
                              f"bias {ptrs.bias:#x}, seed {seed_ptr:#x}, beta {beta})")  # fmt: skip
        self.plan.launch(ptrs, alpha, beta, 0, stream, seed_ptr)


@dataclass(frozen=True)
class _Fill:
    """``mask.cu``'s kernel, as ``launch.kernel`` loads it."""

    source_file: ClassVar[str] = "mask.cu"
    kernel_name: ClassVar[bytes] = b"gemmbridge_fill_mask"
    name: ClassVar[str] = "fill-mask"
    smem_bytes: ClassVar[int] = 0
    threads: ClassVar[int] = 256

    def defines(self) -> dict[str, int]:
        return {}


FILL = _Fill()


def fill_mask(seed_ptr: int, out_ptr: int, rows: int, cols: int, keep: float, stream: int, *, device: int) -> None:
    """Write the mask of a rows × cols x (``mask``'s, the seed read at ``seed_ptr``) as ``rows · cols`` bytes, 1 kept
    and 0 dropped, at ``out_ptr`` on ``stream`` of ``device``."""
    limit = threshold(keep)
    count = rows * cols
    found = kernels.device_info(device)
    if found is None:
        raise BackendUnavailableError(f"dropout: the driver cannot describe cuda:{device}")
    if count <= 0:
        return
    address = int(launch.kernel(FILL, device, found[1]))
    block = np.array([seed_ptr, out_ptr, count, limit], dtype=np.int64)
    params = np.array([block.ctypes.data], dtype=np.uint64)
    blocks = min(-(-count // (8 * FILL.threads)), 16 * found[2])
    fill = launch.Launch(address, (blocks, 1, 1), FILL.threads, 0, found[1], "the dropout mask's fill")
    fill(stream, params.ctypes.data)
