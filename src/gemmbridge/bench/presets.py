"""The shapes ``gemmbridge bench`` times: named presets per device, and ``MxNxK[xBATCH]`` from the command line.

A shape is ``(batch ×) M×N×K``: ``op(a)`` is ``(batch, M, K)`` (or ``(M, K)``), ``op(b)`` is ``(batch, K, N)``;
each is row-major, or a transposed view of a row-major array (``transpose_a`` / ``transpose_b``) where that
is how the caller holds it (LoRA's adapters, a weight used as ``x @ W.T``). CUDA presets are sized so that
the default run (bf16, the default presets) finishes in under two minutes on an H100; CPU presets stop at
1024 so that the default run takes under a minute on two cores. ``skinny`` (the bandwidth-bound
shapes of docs/kernels.md, with their ≥ 80 % of copy bandwidth target) runs when named or with ``all``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError

SMALL_FLOPS = 2 * 256**3  # at or below this, a shape also gets host µs per call


@dataclass(frozen=True)
class Shape:
    m: int
    n: int
    k: int
    batch: int = 1
    preset: str = "custom"
    transpose_a: bool = False  # op(a) is a transposed view of a row-major (K, M) array
    transpose_b: bool = False  # op(b) is a transposed view of a row-major (N, K) array
    role: str = ""  # what the GEMM is in a model, e.g. "x·Aᵀ"

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k * self.batch

    def nbytes(self, itemsize: int) -> int:
        """Bytes a GEMM must move at least: read A and B, write C."""
        return (self.m * self.k + self.k * self.n + self.m * self.n) * self.batch * itemsize

    @property
    def small(self) -> bool:
        """Host µs per call is measured too (the small preset, and small shapes given with --shape)."""
        return self.preset == "small" or (self.preset == "custom" and self.flops <= SMALL_FLOPS)

    @property
    def a_shape(self) -> tuple[int, ...]:
        return (self.m, self.k) if self.batch == 1 else (self.batch, self.m, self.k)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return (self.k, self.n) if self.batch == 1 else (self.batch, self.k, self.n)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.m, self.n) if self.batch == 1 else (self.batch, self.m, self.n)

    @property
    def layout(self) -> str:
        """``n`` (row-major) or ``t`` (transposed view) for op(a), then for op(b): ``nt`` is ``a @ b.T``."""
        return "nt"[self.transpose_a] + "nt"[self.transpose_b]

    def __str__(self) -> str:
        text = f"{self.m}x{self.n}x{self.k}"
        text = text if self.batch == 1 else f"{text}x{self.batch}"
        return text if self.layout == "nn" else f"{text}:{self.layout}"


def _square(sizes: tuple[int, ...]) -> list[Shape]:
    return [Shape(s, s, s, preset="square") for s in sizes]


def _llm(tokens: int, d: int, q_kv: int, ffn: int) -> list[Shape]:
    """Projections of one transformer layer for ``tokens`` tokens: x(T, d) @ W(d, out)."""
    return [
        Shape(tokens, q_kv, d, preset="llm"),  # fused q, k, v
        Shape(tokens, 2 * ffn, d, preset="llm"),  # fused gate + up
        Shape(tokens, d, ffn, preset="llm"),  # down
        Shape(16, q_kv, d, preset="llm"),  # decode step, 16 sequences
        Shape(16, d, ffn, preset="llm"),
    ]


def _lora(tokens: int, d: int) -> list[Shape]:
    """LoRA adapters: down-projection T×r×d (x @ A) and up-projection T×d×r (h @ B), r in 8..64."""
    shapes = []
    for r in (8, 16, 32, 64):
        shapes += [Shape(tokens, r, d, preset="lora"), Shape(tokens, d, r, preset="lora")]
    return shapes


SKINNY_TARGET_PCT = 80.0  # the target: a skinny GEMM moves its bytes at ≥ 80 % of the copy bandwidth


def lora_roles(tokens: int, d: int, r: int) -> list[Shape]:
    """The five GEMMs of a LoRA adapter, ``y = x·Aᵀ·Bᵀ``, in the layouts a layer holds: x, dy (T, d), A (r, d),
    B (d, r) row-major, so Aᵀ, Bᵀ, dyᵀ and dyBᵀ are transposed views. Forward ``xa = x·Aᵀ``, ``x·Aᵀ·Bᵀ``;
    backward ``dyB = dy·B``, ``dB = dyᵀ·xa``, ``dA = dyBᵀ·x``."""
    return [
        Shape(tokens, r, d, transpose_b=True, preset="skinny", role="x·Aᵀ"),  # reads x
        Shape(tokens, d, r, transpose_b=True, preset="skinny", role="xa·Bᵀ"),  # writes T×d
        Shape(tokens, r, d, preset="skinny", role="dy·B"),  # reads dy
        Shape(d, r, tokens, transpose_a=True, preset="skinny", role="dyᵀ·xa"),  # reduces over T
        Shape(r, d, tokens, transpose_a=True, preset="skinny", role="dyBᵀ·x"),  # reduces over T, reads x
    ]


def decode_steps(rows: tuple[int, ...], weights: tuple[tuple[int, int], ...]) -> list[Shape]:
    """Decode: ``x (M, d_in) · Wᵀ`` for each weight ``W (d_out, d_in)`` (nn.Linear's layout, read once)."""
    return [
        Shape(m, out, into, transpose_b=True, preset="skinny", role="decode x·Wᵀ")
        for out, into in weights
        for m in rows
    ]


DECODE_ROWS = (1, 4, 8, 16)


def skinny_shapes(
    tokens: tuple[int, ...], d: int, ranks: tuple[int, ...], rows: tuple[int, ...], weights: tuple[tuple[int, int], ...]
) -> list[Shape]:
    """LoRA's five GEMMs at each ``tokens`` × rank, then decode steps of ``rows`` rows for each ``(d_out, d_in)``."""
    return [s for t in tokens for r in ranks for s in lora_roles(t, d, r)] + decode_steps(rows, weights)


# the skinny sizes on CUDA (d = 4096; Llama-3-8B's MLP weights for decode); a CPU run's sizes stop at 2816
SKINNY: dict[str, dict[str, Any]] = {
    "cuda": {"tokens": (4096, 16384), "d": 4096, "ranks": (8, 16, 64), "rows": DECODE_ROWS,
             "weights": ((4096, 4096), (14336, 4096), (4096, 14336))},
    "cpu": {"tokens": (256,), "d": 1024, "ranks": (8, 16, 64), "rows": DECODE_ROWS,
            "weights": ((1024, 1024), (2816, 1024), (1024, 2816))},
}  # fmt: skip


def _small(sizes: tuple[int, ...], batch: int) -> list[Shape]:
    return [Shape(s, s, s, preset="small") for s in sizes] + [Shape(64, 64, 64, batch, preset="small")]


PRESETS: dict[str, dict[str, list[Shape]]] = {
    "cuda": {
        "square": _square((256, 512, 1024, 2048, 4096, 8192)),
        "llm": _llm(tokens=4096, d=4096, q_kv=6144, ffn=14336),  # Llama-3-8B sized, 4096 tokens
        "lora": _lora(tokens=4096, d=4096),
        "small": _small((16, 64, 128, 256), batch=32),
        "skinny": skinny_shapes(**SKINNY["cuda"]),
    },
    "cpu": {
        "square": _square((64, 128, 256, 512, 1024)),
        "llm": _llm(tokens=256, d=1024, q_kv=1536, ffn=2816),
        "lora": _lora(tokens=256, d=1024),
        "small": _small((16, 32, 64), batch=8),
        "skinny": skinny_shapes(**SKINNY["cpu"]),
    },
}
DEFAULT_PRESETS = ("square", "llm", "lora", "small")  # what a run without --preset or --shape times
PEAK_SIZE = {"cuda": 8192, "cpu": 1024}  # M = N = K of the GEMM that measures the peak


def preset_shapes(device: str, names: list[str]) -> list[Shape]:
    """The shapes of the named presets (``all`` for every one), in order, without repeats."""
    table = PRESETS[device]
    if "all" in names:
        names = list(table)
    shapes: list[Shape] = []
    for name in names:
        if name not in table:
            raise OptionError(f"unknown preset {name!r} (choose from {', '.join(table)}, all)")
        shapes += [s for s in table[name] if s not in shapes]
    return shapes


_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)(?:x(\d+))?$")


def parse_shape(text: str, flag: str = "--shape") -> Shape:
    """``MxNxK`` or ``MxNxKxBATCH`` (``×`` works too) → Shape; errors name ``flag``, the option it came from."""
    match = _SHAPE.match(text.strip().lower().replace("×", "x"))
    if not match:
        raise OptionError(f"{flag} {text!r} is not MxNxK or MxNxKxBATCH (e.g. 4096x4096x4096)")
    m, n, k, batch = (int(g) if g else 1 for g in match.groups())
    if min(m, n, k, batch) < 1:
        raise OptionError(f"{flag} {text!r} has a zero dimension")
    return Shape(m, n, k, batch)
