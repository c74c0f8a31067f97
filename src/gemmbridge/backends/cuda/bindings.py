"""cuBLASLt through nvmath-python's generated bindings: the only module that hands raw pointers to it.

A ``LtPlan`` owns the descriptors, layouts and chosen algorithm of one problem;
``launch`` is the hot path: one ``cublasLtMatmul`` per outer batch offset.
Every enum comes from ``nvmath.bindings`` / ``nvmath`` — none is written here. The compute
type is cuBLAS's ``cublasComputeType_t`` (``cublas.ComputeType``), not the library-wide
``nvmath.ComputeType``, whose values differ.
"""

from __future__ import annotations

import threading

import numpy as np
from nvmath import CudaDataType
from nvmath.bindings import cublas
from nvmath.bindings import cublasLt as lt

from ...errors import VendorError
from ...problem import Layout, Problem

WORKSPACE_BYTES = 32 * 1024 * 1024
HEURISTIC_CANDIDATES = 8

_DATA_TYPE = {
    "float16": CudaDataType.CUDA_R_16F,
    "bfloat16": CudaDataType.CUDA_R_16BF,
    "float32": CudaDataType.CUDA_R_32F,
    "float64": CudaDataType.CUDA_R_64F,
}
_EPILOGUE = {
    ("none", False): lt.Epilogue.DEFAULT,
    ("none", True): lt.Epilogue.BIAS,
    ("relu", False): lt.Epilogue.RELU,
    ("relu", True): lt.Epilogue.RELU_BIAS,
    ("gelu", False): lt.Epilogue.GELU,
    ("gelu", True): lt.Epilogue.GELU_BIAS,
}
_Desc = lt.MatmulDescAttribute
_Lay = lt.MatrixLayoutAttribute
_Pref = lt.MatmulPreferenceAttribute

_handles: dict[int, int] = {}
_handles_lock = threading.Lock()


def handle(device: int) -> int:
    """The process's cuBLASLt handle for ``device`` (cuBLASLt handles are thread-safe)."""
    h = _handles.get(device)
    if h is None:
        with _handles_lock:
            h = _handles.get(device)
            if h is None:
                h = _handles[device] = lt.create()
    return h


def version() -> int:
    return lt.get_version()


def compute_types(dtype: str, tf32: bool) -> tuple[int, int]:
    """cuBLAS compute type and scale (alpha/beta) type: fp32 accumulation for half types, TF32 when asked."""
    if dtype == "float64":
        return cublas.ComputeType.COMPUTE_64F, CudaDataType.CUDA_R_64F
    if tf32 and dtype == "float32":
        return cublas.ComputeType.COMPUTE_32F_FAST_TF32, CudaDataType.CUDA_R_32F
    return cublas.ComputeType.COMPUTE_32F, CudaDataType.CUDA_R_32F


def _set(setter, dtype_of, obj: int, attr: int, value: int) -> None:  # type: ignore[no-untyped-def]
    buf = np.array(value, dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.itemsize)


def _status(error: Exception) -> str:
    status = getattr(error, "status", None)
    return lt.get_status_name(status) if isinstance(status, int) else str(error)


def _describe(problem: Problem) -> str:
    return (
        f"{problem.dtype} m={problem.m} n={problem.n} k={problem.k} batch={problem.batch_shape} "
        f"epilogue={problem.epilogue} bias={problem.has_bias} on {problem.device}"
    )


class LtPlan:
    """Descriptors, layouts and algorithm of one problem, created once and reused."""

    def __init__(self, device: int, problem: Problem, tf32: bool, alignments: tuple[int, int, int, int]) -> None:
        self.handle = handle(device)
        self.layouts: list[int] = []
        self.desc = 0
        compute, scale = compute_types(problem.dtype, tf32)
        wide = problem.dtype == "float64"
        self.scalars = np.array([1.0, 0.0], dtype=np.float64 if wide else np.float32)
        self.alpha_ptr = self.scalars.ctypes.data
        self.beta_ptr = self.alpha_ptr + self.scalars.itemsize
        self.bias_slot = np.zeros(1, dtype=np.int64)
        self.bias_slot_ptr = self.bias_slot.ctypes.data
        self.has_bias = problem.has_bias
        size = problem.itemsize
        self.offsets = tuple(tuple(o * size for o in offs) for offs in problem.outer_offsets)
        try:
            self.desc = lt.matmul_desc_create(compute, scale)
            dset = lt.matmul_desc_set_attribute
            ddt = lt.get_matmul_desc_attribute_dtype
            op = {False: cublas.Operation.N, True: cublas.Operation.T}
            _set(dset, ddt, self.desc, _Desc.TRANSA, op[problem.lt_a.transpose])
            _set(dset, ddt, self.desc, _Desc.TRANSB, op[problem.lt_b.transpose])
            _set(dset, ddt, self.desc, _Desc.EPILOGUE, _EPILOGUE[problem.epilogue, problem.has_bias])
            data_type = _DATA_TYPE[problem.dtype]
            self.la, self.lb, self.lc, self.ld = (
                self._layout(data_type, lay, problem.batch_count)
                for lay in (problem.lt_a, problem.lt_b, problem.lt_c, problem.lt_d)
            )
            self.algo, self.workspace_size = self._choose(problem, alignments)
            self.algo_ptr = self.algo.ptr
        except Exception:
            self.close()
            raise

    def _layout(self, data_type: int, lay: Layout, batch: int) -> int:
        h = lt.matrix_layout_create(data_type, lay.rows, lay.cols, lay.ld)
        self.layouts.append(h)
        if batch > 1:
            lset, ldt = lt.matrix_layout_set_attribute, lt.get_matrix_layout_attribute_dtype
            _set(lset, ldt, h, _Lay.BATCH_COUNT, batch)
            _set(lset, ldt, h, _Lay.STRIDED_BATCH_OFFSET, lay.batch_stride)
        return h

    def _choose(self, problem: Problem, alignments: tuple[int, int, int, int]) -> tuple[lt.MatmulHeuristicResult, int]:
        pref = lt.matmul_preference_create()
        try:
            pset, pdt = lt.matmul_preference_set_attribute, lt.get_matmul_preference_attribute_dtype
            _set(pset, pdt, pref, _Pref.MAX_WORKSPACE_BYTES, WORKSPACE_BYTES)
            names = (
                _Pref.MIN_ALIGNMENT_A_BYTES,
                _Pref.MIN_ALIGNMENT_B_BYTES,
                _Pref.MIN_ALIGNMENT_C_BYTES,
                _Pref.MIN_ALIGNMENT_D_BYTES,
            )
            for attr, align in zip(names, alignments):
                _set(pset, pdt, pref, attr, align)
            results = lt.MatmulHeuristicResult(HEURISTIC_CANDIDATES)
            count = np.zeros(1, dtype=np.int32)
            try:
                lt.matmul_algo_get_heuristic(
                    self.handle,
                    self.desc,
                    self.la,
                    self.lb,
                    self.lc,
                    self.ld,
                    pref,
                    HEURISTIC_CANDIDATES,
                    results.ptr,
                    count.ctypes.data,
                )
            except lt.cuBLASLtError as error:
                raise VendorError(
                    f"matmul: cuBLASLt heuristic failed with {_status(error)} for {_describe(problem)}", _status(error)
                ) from error
        finally:
            lt.matmul_preference_destroy(pref)
        if count[0] == 0:
            raise VendorError(
                f"matmul: cuBLASLt has no algorithm for {_describe(problem)} (alignments {alignments} bytes)",
                "CUBLAS_STATUS_NOT_SUPPORTED",
            )
        self._results = results  # keeps the algorithms' memory alive
        self._candidates = int(count[0])
        self._choice = 0
        best = lt.MatmulHeuristicResult.from_ptr(results.ptr, 1)
        return best, int(best.workspace_size)

    @property
    def candidates(self) -> int:
        """How many algorithms the heuristic offered (at most HEURISTIC_CANDIDATES)."""
        return self._candidates

    @property
    def choice(self) -> int:
        return self._choice

    def select(self, index: int) -> None:
        """Use the heuristic's candidate ``index`` (0 is its first pick)."""
        self._choice = index
        size = lt.matmul_heuristic_result_dtype.itemsize
        self.algo = lt.MatmulHeuristicResult.from_ptr(self._results.ptr + index * size, 1)
        self.algo_ptr = self.algo.ptr
        self.workspace_size = int(self.algo.workspace_size)

    def fall_back(self) -> bool:
        """Switch to the heuristic's next candidate after a refusal; False when none is left."""
        if self._choice + 1 >= self._candidates:
            return False
        self.select(self._choice + 1)
        return True

    def close(self) -> None:
        for h in self.layouts:
            lt.matrix_layout_destroy(h)
        self.layouts = []
        if self.desc:
            lt.matmul_desc_destroy(self.desc)
            self.desc = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


def launch(
    plan: LtPlan,
    problem: Problem,
    a: int,
    b: int,
    c: int,
    d: int,
    bias: int,
    alpha: float,
    beta: float,
    workspace: int,
    stream: int,
) -> None:
    """Enqueue the product on ``stream``; pointers are device addresses, offsets in bytes."""
    scalars = plan.scalars
    scalars[0] = alpha
    scalars[1] = beta
    if plan.has_bias and plan.bias_slot[0] != bias:  # the descriptor keeps the last bias pointer
        plan.bias_slot[0] = bias
        lt.matmul_desc_set_attribute(plan.desc, _Desc.BIAS_POINTER, plan.bias_slot_ptr, 8)
    algo = plan.algo_ptr
    launched = 0
    try:
        for oa, ob, oc, od in plan.offsets:
            # cuBLASLt's A is our b, its B our a (module doc of problem.py)
            lt.matmul(
                plan.handle,
                plan.desc,
                plan.alpha_ptr,
                b + ob,
                plan.la,
                a + oa,
                plan.lb,
                plan.beta_ptr,
                c + oc,
                plan.lc,
                d + od,
                plan.ld,
                algo,
                workspace,
                plan.workspace_size,
                stream,
            )
            launched += 1
    except lt.cuBLASLtError as error:
        if launched == 0 and plan.fall_back():  # nothing enqueued yet: the next algorithm may accept it
            launch(plan, problem, a, b, c, d, bias, alpha, beta, workspace, stream)
            return
        raise VendorError(
            f"matmul: cublasLtMatmul failed with {_status(error)} for {_describe(problem)}", _status(error)
        ) from error
