"""A NumPy stand-in for the skinny kernel (``skinny.cu``), for running its host side on the CPU.

``FakeKernels`` replaces the loading and the launch in ``gemmbridge.backends.cuda.kernels.launch``: a
"kernel" is the ``Config`` it was compiled for, and a launch reads the parameter block at the address
the backend passes, exactly as the kernel does, and computes on host memory what ``skinny.cu`` does:

- per batch ``z // splits`` of the grid, ``D = alpha·A·B + beta·C + bias`` with D row-major ``m × n``;
- A(m, k) at ``a[m·lda + k]`` when the config's A is K-contiguous, else at ``a[k·lda + m]``; B(k, n) at
  ``b[n·ldb + k]`` when K-contiguous, else at ``b[k·ldb + n]``;
- K in ``splits`` ranges of ``k_per_split`` (each a multiple of BK) summed in float32, C unread when beta is 0;
- dropout (``config.mask``, the seed read at the block's seed address, ``threshold / 2¹⁶`` the keep probability):
  "a" zeroes A's dropped elements (A as the M × K matrix it is), "b" B's (K × N), "d" the product's before alpha
  and beta, with ``dropout.mask`` (the same Philox; its own tests check it against Random123's known answers);
- ``mask.cu``'s fill: the mask of ``count`` elements as bytes;
- ``dyonce.cu``: ``g = alpha_g·dy·B`` and, per cluster c of the grid's P, the float32 partial ``dyᵀ·xa`` over row
  tiles c, c + P, … of 128 rows into the workspace; then its reduction ``dB = alpha·Σ_c partial_c + beta·C``.

Every matrix and the bias a launch touches is checked to lie inside one allocation of the emulated device, and
every allocation's guard bytes after each launch (``device_memory``).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
from device_memory import MEMORY, device, raw

from gemmbridge.backends.cuda.kernels import dropout

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
        self.programmatic: list[bool] = []  # per launch: made with the PDL attribute (launch_ex)
        self.streams: list[int] = []  # per launch: its stream
        self.launch_configs: list[int] = []  # per PDL launch: the address of its CUlaunchConfig

    def launch_ex(self, config: int, f: int, params: int, extra: int) -> None:
        """``_v2.launch_kernel_ex``: the CUlaunchConfig at ``config`` read as the driver reads it; it must carry
        exactly the programmatic-stream-serialization attribute, set to 1."""
        from cuda.bindings._v2 import driver

        found = driver.LaunchConfig.from_ptr(config, readonly=True)
        assert found.num_attrs == 1 and found.block_dim_y == found.block_dim_z == 1
        attribute = driver.LaunchAttribute.from_ptr(found.attrs, readonly=True)
        assert attribute.id == driver.LaunchAttributeID.PROGRAMMATIC_STREAM_SERIALIZATION
        assert attribute.value.programmatic_stream_serialization_allowed == 1
        self.launch_configs.append(config)
        self.streams.append(found.h_stream)
        self._launch(f, found.grid_dim_x, found.grid_dim_y, found.grid_dim_z, found.block_dim_x,
                     found.shared_mem_bytes, params, extra, programmatic=True)  # fmt: skip

    def launch(self, f: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, smem: int, stream: int,
               params: int, extra: int) -> None:  # fmt: skip
        """``_v2.launch_kernel``: a launch without PDL."""
        assert by == bz == 1
        self.streams.append(stream)
        self._launch(f, gx, gy, gz, bx, smem, params, extra, programmatic=False)

    def kernel(self, config: Any, device: int, target: str) -> int:
        handle = 7000 + len(self.configs)
        self.configs[handle] = config
        return handle

    def _launch(self, f: int, gx: int, gy: int, gz: int, bx: int, smem: int, params: int, extra: int,
                programmatic: bool) -> None:  # fmt: skip
        assert extra == 0
        self.programmatic.append(programmatic)
        config = self.configs[f]
        if config.kernel_name == dropout.FILL.kernel_name:
            self._fill(gx, gy, gz, bx, smem, params)
            return
        if config.kernel_name.startswith(b"gemmbridge_dyonce"):
            assert bx == config.threads and smem == config.smem_bytes and config.valid
            self.launches.append((config, (gx, gy, gz)))
            block = raw(int(raw(params, np.uint64, 1)[0]), np.int64, 13 if not config.reduce else 9).copy()
            (self._dyonce_reduce if config.reduce else self._dyonce)(config, (gx, gy, gz), block)
            return
        assert bx == config.threads and smem == config.smem_bytes and gz % config.splits == 0
        block = raw(int(raw(params, np.uint64, 1)[0]), np.int64, 21).copy()
        a, b, c, d, bias, lda, ldb, ldc, ldd, sa, sb, sc, sd, m, n, k, kps = (int(x) for x in block[:17])
        alpha, beta = (float(x) for x in block.view(np.float64)[17:19])
        seed, threshold = int(block[19]), int(block[20])
        if config.mask:
            assert seed % 8 == 0 and 0 < threshold <= 1 << 16 and gz == config.splits, "a masked launch: one matrix"
            seed = int(device(seed, np.uint64, 1, "the seed")[0])
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
            if config.mask == "a":
                A = np.where(dropout.mask(seed, m, k, threshold / (1 << 16)), A, np.zeros((), half))
            elif config.mask == "b":
                B = np.where(dropout.mask(seed, k, n, threshold / (1 << 16)), B, np.zeros((), half))
            acc = np.zeros((m, n), np.float32)
            for s in range(config.splits):
                lo, hi = s * kps, min(k, (s + 1) * kps)
                if hi > lo:
                    acc += A[:, lo:hi].astype(np.float32) @ B[lo:hi].astype(np.float32)
            if config.mask == "d":
                acc = np.where(dropout.mask(seed, m, n, threshold / (1 << 16)), acc, np.float32(0))
            acc *= np.float32(alpha)
            if beta != 0:
                acc += np.float32(beta) * _matrix(c + z * sc * out.itemsize, out, m, n, ldc, 1, "C").astype(np.float32)
            if bias:
                acc += device(bias, out, n, "the bias").astype(np.float32)
            _matrix(d + z * sd * out.itemsize, out, m, n, ldd, 1, "D")[...] = acc.astype(out)
        MEMORY.check()

    def _fill(self, gx: int, gy: int, gz: int, bx: int, smem: int, params: int) -> None:
        seed_at, out, count, threshold = (int(x) for x in raw(int(raw(params, np.uint64, 1)[0]), np.int64, 4))
        assert gy == gz == 1 and bx == dropout.FILL.threads and smem == 0 and 1 <= gx <= -(-count // (8 * bx))
        assert seed_at % 8 == 0 and 0 < threshold <= 1 << 16
        self.launches.append((dropout.FILL, (gx, gy, gz)))
        seed = int(device(seed_at, np.uint64, 1, "the seed")[0])
        device(out, np.uint8, count, "the mask")[...] = dropout.mask(seed, 1, count, threshold / (1 << 16)).reshape(-1)
        MEMORY.check()

    def _dyonce(self, config: Any, grid: tuple[int, int, int], block: np.ndarray) -> None:
        dy, b, xa, g, ws, ld_dy, ld_b, ld_xa, ld_g, t, o, clusters = (int(x) for x in block[:12])
        alpha = float(block.view(np.float64)[12])
        r, half = config.rank, _HALF[config.dtype]
        assert grid == (8, clusters, 1) and 8 * config.slices * 128 >= o > 8 * (config.slices - 1) * 128 and o % 8 == 0
        assert 1 <= clusters <= -(-t // 128), "a cluster without a row tile"
        assert all(p % 16 == 0 for p in (dy, b, xa, g, ws)) and ld_dy % 8 == ld_b % 8 == ld_xa % 8 == ld_g % 8 == 0
        DY, B, XA = (_matrix(p, half, rows, cols, ld, 1, what).astype(np.float32)
                     for p, rows, cols, ld, what in ((dy, t, o, ld_dy, "dy"), (b, o, r, ld_b, "B"),
                                                     (xa, t, r, ld_xa, "xa")))  # fmt: skip
        _matrix(g, half, t, r, ld_g, 1, "g")[...] = (np.float32(alpha) * (DY @ B)).astype(half)
        partials = device(ws, np.float32, clusters * o * r, "the workspace").reshape(clusters, o, r)
        rows = np.arange(t) // 128 % clusters  # the cluster that walks each row's tile
        for c in range(clusters):
            partials[c] = DY[rows == c].T @ XA[rows == c]
        MEMORY.check()

    def _dyonce_reduce(self, config: Any, grid: tuple[int, int, int], block: np.ndarray) -> None:
        ws, c, db, ld_c, ld_db, o, clusters = (int(x) for x in block[:7])
        alpha, beta = (float(x) for x in block.view(np.float64)[7:9])
        r = config.rank
        out = np.dtype(np.float32) if config.out_f32 else _HALF[config.dtype]
        assert grid[1] == grid[2] == 1 and grid[0] >= 1 and all(p % 16 == 0 for p in (ws, c, db))
        partials = device(ws, np.float32, clusters * o * r, "the workspace").reshape(clusters, o, r)
        total = partials.sum(axis=0, dtype=np.float32)
        result = np.float32(alpha) * total
        if beta != 0:
            result += np.float32(beta) * _matrix(c, out, o, r, ld_c, 1, "C").astype(np.float32)
        _matrix(db, out, o, r, ld_db, 1, "dB")[...] = result.astype(out)
        MEMORY.check()
