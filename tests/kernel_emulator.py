"""A NumPy stand-in for the skinny kernel (``skinny.cu``), for running its host side on the CPU.

``FakeKernels`` replaces the loading and the launch in ``gemmbridge.backends.cuda.kernels.launch``: a
"kernel" is the ``Config`` it was compiled for, and a launch reads the parameter block at the address
the backend passes, exactly as the kernel does, and computes on host memory what ``skinny.cu`` does:

- per batch ``z // splits`` of the grid, ``D = alpha·A·B + beta·C + bias`` with D row-major ``m × n``;
- A(m, k) at ``a[m·lda + k]`` when the config's A is K-contiguous, else at ``a[k·lda + m]``; B(k, n) at
  ``b[n·ldb + k]`` when K-contiguous, else at ``b[k·ldb + n]``;
- K in ``splits`` ranges of ``k_per_split`` (each a multiple of BK) summed in float32, C unread when beta is 0.

Every matrix and the bias a launch touches is checked to lie inside one allocation of the emulated device, and
every allocation's guard bytes after each launch (``device_memory``).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
from device_memory import MEMORY, device, raw

_HALF = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def _matrix(
    address: int, dtype: np.dtype, rows: int, cols: int, row_stride: int, col_stride: int, what: str
) -> np.ndarray:
    extent = (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    base = device(address, dtype, extent, what)
    strides = (row_stride * dtype.itemsize, col_stride * dtype.itemsize)
    return np.lib.stride_tricks.as_strided(base, (rows, cols), strides)


class FakeKernels:
    """``kernel`` and ``launch`` of the skinny kernel, emulated; ``launches`` records (config, grid) per launch."""

    def __init__(self) -> None:
        self.configs: dict[int, Any] = {}
        self.launches: list[tuple[Any, tuple[int, int, int]]] = []

    def kernel(self, config: Any, device: int, target: str) -> int:
        handle = 7000 + len(self.configs)
        self.configs[handle] = config
        return handle

    def launch(self, f: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, smem: int, stream: int,
               params: int, extra: int) -> None:  # fmt: skip
        config = self.configs[f]
        assert bx == config.threads and smem == config.smem_bytes and gz % config.splits == 0
        block = raw(int(raw(params, np.uint64, 1)[0]), np.int64, 19).copy()
        a, b, c, d, bias, lda, ldb, ldc, ldd, sa, sb, sc, sd, m, n, k, kps = (int(x) for x in block[:17])
        alpha, beta = (float(x) for x in block.view(np.float64)[17:19])
        assert gx * config.bn >= n and gy * config.bm >= m and kps % config.bk == 0 and kps * config.splits >= k
        assert gy <= 65535 and gz <= 65535 and config.valid, "a launch the hardware refuses"
        out_size = 4 if config.out_f32 else 2
        assert all(p % 16 == 0 for p in (a, b, c, d, bias)), "the kernel reads 16-byte pieces"
        assert lda % 8 == ldb % 8 == sa % 8 == sb % 8 == 0 and n % 8 == 0
        assert (ldc * out_size) % 16 == (ldd * out_size) % 16 == (sc * out_size) % 16 == (sd * out_size) % 16 == 0
        assert (k if config.a_kcontig else m) % 8 == 0 and (k if config.b_kcontig else n) % 8 == 0
        self.launches.append((config, (gx, gy, gz)))
        half = _HALF[config.dtype]
        out = np.dtype(np.float32) if config.out_f32 else half
        for z in range(gz // config.splits):
            A = _matrix(a + z * sa * half.itemsize, half, m, k, *((lda, 1) if config.a_kcontig else (1, lda)), "A")
            B = _matrix(b + z * sb * half.itemsize, half, k, n, *((1, ldb) if config.b_kcontig else (ldb, 1)), "B")
            acc = np.zeros((m, n), np.float32)
            for s in range(config.splits):
                lo, hi = s * kps, min(k, (s + 1) * kps)
                if hi > lo:
                    acc += A[:, lo:hi].astype(np.float32) @ B[lo:hi].astype(np.float32)
            acc *= np.float32(alpha)
            if beta != 0:
                acc += np.float32(beta) * _matrix(c + z * sc * out.itemsize, out, m, n, ldc, 1, "C").astype(np.float32)
            if bias:
                acc += device(bias, out, n, "the bias").astype(np.float32)
            _matrix(d + z * sd * out.itemsize, out, m, n, ldd, 1, "D")[...] = acc.astype(out)
        MEMORY.check()
