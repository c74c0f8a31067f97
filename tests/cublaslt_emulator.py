"""A NumPy stand-in for the cuBLASLt library, for running the CUDA backend's own code on the CPU.

``FakeLt`` replaces ``nvmath.bindings.cublasLt`` inside ``gemmbridge.backends.cuda.bindings``: the
enums and attribute dtypes are the real ones, the library calls are emulated. Descriptor and
layout attributes are read from the host buffers the backend passes, exactly as the library reads
them, and ``matmul`` computes what cuBLASLt documents, in its column-major terms, on host memory:

- ``D = alpha·op(A)·op(B) + beta·C`` per batch (C unread when beta is 0); A, B, C, D column-major
  ``rows × cols`` with ``ld``;
- bias (``BIAS_POINTER``) has one element per row of D and is added along each column;
- ``*_AUX`` writes the pre-activation to aux (``EPILOGUE_AUX_POINTER``, column-major, leading
  dimension ``EPILOGUE_AUX_LD``; the relu mask as bits, bit ``i + j·ld`` of a little-endian bit
  string), ``D*`` multiplies by the activation's derivative read from aux;
- ``*_BGRAD`` of ``DRELU``/``DGELU`` sums D over its columns into the bias pointer (one per row);
  ``BGRADA`` sums op(A) over K (one per row of D), ``BGRADB`` sums op(B) over K (one per column);
  like the library, the heuristic offers nothing for ``BGRADB`` unless B is read transposed, nor for
  ``BGRADA`` unless A is read as stored.

The algorithm space is emulated too (``matmul_algo_get_ids``, ``_init``, ``_cap_get_attribute``,
``_config_get/set_attribute``, ``_check``): ids 0, 1, 2 (the heuristic returns 0 and 1); an algorithm's
64 bytes hold ``[id + 1, tile, stages, split-K, reduction, swizzle, custom, inner | cluster << 16]``;
``matmul_algo_check`` refuses an undefined tile, a cluster other than auto, 1x1x1 or 2x1x1, split-K
without a reduction scheme, and asks more workspace than gemmbridge has for split-K 8.

The device "pointers" are host addresses of the emulated device's allocations (``device_memory``), so the test
arrays must stay alive; every matrix, bias and aux a product touches is checked to lie inside one allocation, and
every allocation's guard bytes after each product.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from typing import Any

import ml_dtypes
import numpy as np
from device_memory import MEMORY, device, raw
from nvmath import CudaDataType
from nvmath.bindings import cublas
from nvmath.bindings import cublasLt as real

from gemmbridge.reference import gelu, gelu_grad

_NUMPY = {
    int(CudaDataType.CUDA_R_16F): np.dtype(np.float16),
    int(CudaDataType.CUDA_R_16BF): np.dtype(ml_dtypes.bfloat16),
    int(CudaDataType.CUDA_R_32F): np.dtype(np.float32),
    int(CudaDataType.CUDA_R_64F): np.dtype(np.float64),
}
_D = real.MatmulDescAttribute
_L = real.MatrixLayoutAttribute
_CFG = real.MatmulAlgoConfigAttribute
_CAP = real.MatmulAlgoCapAttribute
SLOT = {_CFG.ID: 0, _CFG.TILE_ID: 1, _CFG.STAGES_ID: 2, _CFG.SPLITK_NUM: 3, _CFG.REDUCTION_SCHEME: 4,
        _CFG.CTA_SWIZZLING: 5, _CFG.CUSTOM_OPTION: 6}  # fmt: skip
TILES = [int(real.MatmulTile.TILE_128x64), int(real.MatmulTile.TILE_128x128), int(real.MatmulTile.TILE_128x256)]
STAGES = [int(real.MatmulStages.STAGES_64x4), int(real.MatmulStages.STAGES_128x4)]
CAPS = {
    _CAP.TILE_IDS: TILES,
    _CAP.STAGES_IDS: STAGES,
    _CAP.SPLITK_SUPPORT: [1],
    _CAP.CTA_SWIZZLING_SUPPORT: [1],
    _CAP.REDUCTION_SCHEME_MASK: [int(real.ReductionScheme.INPLACE) | int(real.ReductionScheme.COMPUTE_TYPE)],
}
CLUSTERS_OK = {int(getattr(real.ClusterShape, f"SHAPE_{s}")) for s in ("AUTO", "1x1x1", "2x1x1")}


def _read(ptr: int, size: int, dtype: Any) -> Any:
    return raw(ptr, dtype, size // np.dtype(dtype).itemsize)[0]


class LtError(Exception):
    """``cuBLASLtError`` as the bindings raise it (the real class loads the library to name the status)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"cuBLASLt status {status}")
        self.status = status


class FakeLt:
    """The library calls of ``cublasLt`` emulated; everything else is the real module's."""

    cuBLASLtError = LtError

    @staticmethod
    def get_status_name(status: int) -> str:
        return f"CUBLAS_STATUS_{cublas.Status(status).name}"

    def __init__(self) -> None:
        self.objects: dict[int, dict] = {}
        self.ids = itertools.count(1000)
        self.matmuls = 0
        self.refuse: set[int] = set()  # algorithm indices that answer NOT_SUPPORTED
        self.calls: list[tuple[int, int]] = []  # (algorithm index, D address) of each product
        self.last: tuple[int, ...] = ()  # the 8 words of the algorithm of the last product
        self.checks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(real, name)

    def _new(self, **attrs: Any) -> int:
        handle = next(self.ids)
        self.objects[handle] = attrs
        return handle

    # -- handles, descriptors, layouts, preferences ------------------------------------------------
    def create(self) -> int:
        return self._new(kind="handle")

    def matmul_desc_create(self, compute: int, scale: int) -> int:
        return self._new(kind="desc", compute=int(compute), scale=int(scale))

    def matmul_desc_set_attribute(self, desc: int, attr: int, ptr: int, size: int) -> None:
        self.objects[desc][int(attr)] = _read(ptr, size, real.get_matmul_desc_attribute_dtype(attr))

    def matrix_layout_create(self, dtype: int, rows: int, cols: int, ld: int) -> int:
        return self._new(kind="layout", dtype=_NUMPY[int(dtype)], rows=rows, cols=cols, ld=ld,
                         batch=1, stride=0)  # fmt: skip

    def matrix_layout_set_attribute(self, layout: int, attr: int, ptr: int, size: int) -> None:
        value = int(_read(ptr, size, real.get_matrix_layout_attribute_dtype(attr)))
        self.objects[layout]["batch" if attr == _L.BATCH_COUNT else "stride"] = value

    def matmul_preference_create(self) -> int:
        return self._new(kind="pref")

    def matmul_preference_set_attribute(self, *args: Any) -> None:
        pass

    def matmul_algo_get_heuristic(self, handle, desc, la, lb, lc, ld, pref, wanted, results, count) -> None:  # type: ignore[no-untyped-def]
        attrs = self.objects[desc]
        epilogue = real.Epilogue(int(attrs.get(int(_D.EPILOGUE), real.Epilogue.DEFAULT))).name
        transposed = {
            k: attrs.get(int(a), 0) == int(cublas.Operation.T) for k, a in (("a", _D.TRANSA), ("b", _D.TRANSB))
        }
        if (epilogue == "BGRADB" and not transposed["b"]) or (epilogue == "BGRADA" and transposed["a"]):
            raw(count, np.int32, 1)[0] = 0  # as cuBLASLt 130100 answers on an H200
            return
        size = real.matmul_heuristic_result_dtype.itemsize
        ctypes.memset(results, 0, wanted * size)
        for i in range(min(2, wanted)):  # two candidates: ids 0 and 1 (told apart by the algorithm's first word)
            raw(results + i * size, np.uint64, 8)[:] = [i + 1, TILES[1], STAGES[0], 1, 0, 0, 0, 0]
        raw(count, np.int32, 1)[0] = min(2, wanted)

    # -- the algorithm space ---------------------------------------------------------------------------
    def matmul_algo_get_ids(self, handle, compute, scale, at, bt, ct, dt, wanted) -> tuple:  # type: ignore[no-untyped-def]
        return (0, 1, 2)[:wanted]

    def matmul_algo_init(self, handle, compute, scale, at, bt, ct, dt, algo_id, algo) -> None:  # type: ignore[no-untyped-def]
        raw(algo, np.uint64, 8)[:] = [algo_id + 1, 0, 0, 1, 0, 0, 0, 0]

    def matmul_algo_cap_get_attribute(self, algo, attr, buf, size, written) -> None:  # type: ignore[no-untyped-def]
        dtype = np.dtype(real.get_matmul_algo_cap_attribute_dtype(attr))
        values = np.array(CAPS.get(int(attr), [0]), dtype=dtype)
        raw(written, np.uint64, 1)[0] = values.nbytes
        if size:
            raw(buf, dtype, size // dtype.itemsize)[: len(values)] = values[: size // dtype.itemsize]

    def _slot(self, algo: int, attr: int) -> tuple[np.ndarray, int, int]:
        """The word of ``attr`` in an algorithm, its shift and mask."""
        words = raw(algo, np.uint64, 8)
        if attr in (_CFG.INNER_SHAPE_ID, _CFG.CLUSTER_SHAPE_ID):
            return words, 7, 0 if attr == _CFG.INNER_SHAPE_ID else 16
        return words, SLOT[attr], 0

    def matmul_algo_config_get_attribute(self, algo, attr, buf, size, written) -> None:  # type: ignore[no-untyped-def]
        words, i, shift = self._slot(algo, int(attr))
        value = ((int(words[i]) >> shift) & (0xFFFF if i == 7 else (1 << 64) - 1)) - (attr == _CFG.ID)
        dtype = np.dtype(real.get_matmul_algo_config_attribute_dtype(attr))  # the field's low bytes, as C reads it
        raw(buf, dtype, 1)[0] = np.frombuffer((value % (1 << 64)).to_bytes(8, "little")[: dtype.itemsize], dtype)[0]
        raw(written, np.uint64, 1)[0] = size

    def matmul_algo_config_set_attribute(self, algo, attr, buf, size) -> None:  # type: ignore[no-untyped-def]
        words, i, shift = self._slot(algo, int(attr))
        value = int(raw(buf, real.get_matmul_algo_config_attribute_dtype(attr), 1)[0])
        if i == 7:
            words[7] = (int(words[7]) & ~(0xFFFF << shift)) | (value << shift)
        else:
            words[i] = value + (attr == _CFG.ID)

    def matmul_algo_check(self, handle, desc, la, lb, lc, ld, algo, result) -> None:  # type: ignore[no-untyped-def]
        self.checks += 1
        _, tile, _, splitk, reduction, _, _, shapes = (int(w) for w in raw(algo, np.uint64, 8))
        if tile == 0 or (shapes >> 16) not in CLUSTERS_OK or (splitk > 1 and reduction == 0):
            raise LtError(int(cublas.Status.NOT_SUPPORTED))
        raw(result + 64, np.uint64, 1)[0] = (64 << 20) if splitk == 8 else 1024 * (splitk - 1)

    def matmul_preference_destroy(self, pref: int) -> None:
        self.objects.pop(pref, None)

    def matrix_layout_destroy(self, layout: int) -> None:
        self.objects.pop(layout, None)

    def matmul_desc_destroy(self, desc: int) -> None:
        self.objects.pop(desc, None)

    # -- the product -----------------------------------------------------------------------------------
    def _operand(self, address: int, layout: dict, batch: int, what: str) -> np.ndarray:
        """Batch ``batch`` of a column-major operand, as a (rows, cols) view of device memory."""
        dtype = layout["dtype"]
        base = address + batch * layout["stride"] * dtype.itemsize
        return _column_major(base, dtype, layout["rows"], layout["cols"], layout["ld"], f"{what}[{batch}]")

    def matmul(self, handle, desc, alpha, a, la, b, lb, beta, c, lc, d, ld, algo, ws, ws_size, stream) -> None:  # type: ignore[no-untyped-def]
        time.sleep(0)  # the real call releases the GIL: let other threads run, as they would
        index = int(raw(algo, np.int64, 1)[0]) - 1
        if index in self.refuse:
            raise LtError(int(cublas.Status.NOT_SUPPORTED))
        self.matmuls += 1
        self.calls.append((index, d))
        self.last = tuple(int(w) for w in raw(algo, np.uint64, 8))
        attrs = self.objects[desc]
        scalar = np.float64 if attrs["compute"] == int(cublas.ComputeType.COMPUTE_64F) else np.float32
        alpha_v, beta_v = float(raw(alpha, scalar, 1)[0]), float(raw(beta, scalar, 1)[0])
        trans_a = attrs.get(int(_D.TRANSA), 0) == int(cublas.Operation.T)
        trans_b = attrs.get(int(_D.TRANSB), 0) == int(cublas.Operation.T)
        epilogue = real.Epilogue(int(attrs.get(int(_D.EPILOGUE), real.Epilogue.DEFAULT))).name
        layouts = [self.objects[h] for h in (la, lb, lc, ld)]
        for i in range(layouts[3]["batch"]):
            A = self._operand(a, layouts[0], i, "A").astype(np.float64)
            B = self._operand(b, layouts[1], i, "B").astype(np.float64)
            A, B = (A.T if trans_a else A), (B.T if trans_b else B)
            P = alpha_v * (A @ B)
            if beta_v != 0.0:  # as in BLAS, C is not read when beta is 0
                P = P + beta_v * self._operand(c, layouts[2], i, "C").astype(np.float64)
            self._epilogue(epilogue, attrs, P, A, B, self._operand(d, layouts[3], i, "D"))
        MEMORY.check()

    def _epilogue(self, name: str, attrs: dict, P: np.ndarray, A: np.ndarray, B: np.ndarray, D: np.ndarray) -> None:
        rows, cols = D.shape
        bias_ptr = int(attrs.get(int(_D.BIAS_POINTER), 0))
        aux_ptr, aux_ld = int(attrs.get(int(_D.EPILOGUE_AUX_POINTER), 0)), int(attrs.get(int(_D.EPILOGUE_AUX_LD), 0))

        def mask() -> np.ndarray:  # the relu aux: bit i + j·ld for element (i, j)
            return device(aux_ptr, np.uint8, aux_ld * cols // 8, "the relu aux mask")

        if "BIAS" in name:
            P = P + device(bias_ptr, D.dtype, rows, "the bias").astype(np.float64)[:, None]
        if name in ("GELU_AUX", "GELU_AUX_BIAS"):
            _column_major(aux_ptr, D.dtype, rows, cols, aux_ld, "the gelu aux")[...] = P
        if name in ("RELU_AUX", "RELU_AUX_BIAS"):
            bits = np.unpackbits(mask(), bitorder="little")
            for j in range(cols):
                bits[j * aux_ld : j * aux_ld + rows] = P[:, j] > 0
            mask()[...] = np.packbits(bits, bitorder="little")
        if name.startswith(("RELU", "GELU")):
            P = np.maximum(P, 0.0) if name.startswith("RELU") else gelu(P)
        if name.startswith("DGELU"):
            P = P * gelu_grad(_column_major(aux_ptr, D.dtype, rows, cols, aux_ld, "the gelu aux").astype(np.float64))
        if name.startswith("DRELU"):
            bits = np.unpackbits(mask(), bitorder="little")
            P = P * np.stack([bits[j * aux_ld : j * aux_ld + rows] for j in range(cols)], axis=1)
        D[...] = P
        if name in ("DRELU_BGRAD", "DGELU_BGRAD"):
            device(bias_ptr, D.dtype, rows, "the bias gradient")[...] = D.astype(np.float64).sum(axis=1)
        elif name == "BGRADA":
            device(bias_ptr, D.dtype, rows, "the bias gradient")[...] = A.sum(axis=1)
        elif name == "BGRADB":
            device(bias_ptr, D.dtype, cols, "the bias gradient")[...] = B.sum(axis=0)


def _column_major(address: int, dtype: np.dtype, rows: int, cols: int, ld: int, what: str) -> np.ndarray:
    """A column-major rows × cols matrix with leading dimension ``ld`` at device ``address`` (a view)."""
    flat = device(address, dtype, (cols - 1) * ld + rows, what)
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (dtype.itemsize, ld * dtype.itemsize))
