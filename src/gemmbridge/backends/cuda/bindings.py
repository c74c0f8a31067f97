"""cuBLASLt through nvmath-python's generated bindings: the only module that hands raw pointers to it.

A ``LtPlan`` owns the descriptors, layouts and chosen algorithm of one problem (``layouts.LtProblem``);
``launch`` is the hot path: one ``cublasLtMatmul`` per outer batch offset. Every enum comes from
``nvmath.bindings`` / ``nvmath`` — none is written here. The compute type is cuBLAS's
``cublasComputeType_t`` (``cublas.ComputeType``), not the library-wide ``nvmath.ComputeType``,
whose values differ. Every failure of the library becomes a ``VendorError`` naming the problem.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from nvmath import CudaDataType
from nvmath.bindings import cublas
from nvmath.bindings import cublasLt as lt

from ...errors import VendorError
from ...problem import Operands
from .layouts import LtLayout, LtProblem

WORKSPACE_BYTES = 32 * 1024 * 1024
HEURISTIC_CANDIDATES = 8
NOT_SUPPORTED = int(cublas.Status.NOT_SUPPORTED)

_DATA_TYPE = {
    "float16": CudaDataType.CUDA_R_16F,
    "bfloat16": CudaDataType.CUDA_R_16BF,
    "float32": CudaDataType.CUDA_R_32F,
    "float64": CudaDataType.CUDA_R_64F,
}
_Desc = lt.MatmulDescAttribute
_Lay = lt.MatrixLayoutAttribute
_Pref = lt.MatmulPreferenceAttribute

_handles: dict[int, int] = {}
_handles_lock = threading.Lock()


def status_of(error: Exception) -> str:
    status = getattr(error, "status", None)
    return lt.get_status_name(status) if isinstance(status, int) else str(error)


def vendor_error(what: str, error: Exception, problem: str) -> VendorError:
    return VendorError(f"matmul: {what} failed with {status_of(error)} for {problem}", status_of(error))


def handle(device: int) -> int:
    """The process's cuBLASLt handle for ``device`` (cuBLASLt handles are thread-safe)."""
    h = _handles.get(device)
    if h is None:
        with _handles_lock:
            h = _handles.get(device)
            if h is None:
                try:
                    h = _handles[device] = lt.create()
                except Exception as error:  # no driver, no device, out of memory
                    raise vendor_error("cublasLtCreate", error, f"cuda:{device}") from error
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


def _set(setter: Any, dtype_of: Any, obj: int, attr: int, value: int) -> None:
    buf = np.array(value, dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.itemsize)


class LtPlan:
    """Descriptors, layouts and algorithm of one problem, created once and reused by every thread.

    ``lock`` serializes the per-call state (alpha/beta, the bias and aux pointers held by the
    descriptor, the algorithm choice) from the attribute writes to the enqueue.
    """

    def __init__(
        self, device: int, problem: LtProblem, tf32: bool, alignments: tuple[int, int, int, int], described: str
    ) -> None:
        self.handle = handle(device)
        self.device = device
        self.described = described
        self.lock = threading.Lock()
        self.layouts: list[int] = []
        self.desc = 0
        self._results: Any = None
        compute, scale = compute_types(problem.a_dtype, tf32)
        a_type, d_type = _DATA_TYPE[problem.a_dtype], _DATA_TYPE[problem.d_dtype]
        self.types = (compute, scale, a_type, a_type, d_type, d_type)  # for matmul_algo_get_ids / _init
        self.alignments = alignments
        self.tf32 = tf32
        self.problem = problem
        self.scalars = np.array([1.0, 0.0], dtype=np.float64 if problem.a_dtype == "float64" else np.float32)
        self.alpha_ptr = self.scalars.ctypes.data
        self.beta_ptr = self.alpha_ptr + self.scalars.itemsize
        self.epilogue = problem.epilogue
        self.bias_attr = "BIAS" in problem.epilogue or "BGRAD" in problem.epilogue  # bias in, or bias gradient out
        self.aux_attr = problem.aux_ld > 0
        self.slots = np.zeros(2, dtype=np.int64)  # the bias and aux pointers the descriptor holds
        self.offsets = problem.offsets
        try:
            self.desc = lt.matmul_desc_create(compute, scale)
            dset, ddt = lt.matmul_desc_set_attribute, lt.get_matmul_desc_attribute_dtype
            op = {False: cublas.Operation.N, True: cublas.Operation.T}
            _set(dset, ddt, self.desc, _Desc.TRANSA, op[problem.a.transpose])
            _set(dset, ddt, self.desc, _Desc.TRANSB, op[problem.b.transpose])
            _set(dset, ddt, self.desc, _Desc.EPILOGUE, getattr(lt.Epilogue, problem.epilogue))
            if self.bias_attr:  # the bias (or bias gradient) has the result's dtype, said rather than defaulted
                _set(dset, ddt, self.desc, _Desc.BIAS_DATA_TYPE, _DATA_TYPE[problem.d_dtype])
            if self.aux_attr:
                _set(dset, ddt, self.desc, _Desc.EPILOGUE_AUX_LD, problem.aux_ld)
                if "GELU" in problem.epilogue:  # a gelu aux holds the result's dtype (a relu aux is a bit mask)
                    _set(dset, ddt, self.desc, _Desc.EPILOGUE_AUX_DATA_TYPE, _DATA_TYPE[problem.d_dtype])
            self.la, self.lb = (
                self._layout(problem.a_dtype, lay, problem.batch_count) for lay in (problem.a, problem.b)
            )
            self.lc, self.ld = (
                self._layout(problem.d_dtype, lay, problem.batch_count) for lay in (problem.c, problem.d)
            )
            self._choose()
        except lt.cuBLASLtError as error:
            self.close()
            raise vendor_error("creating the cuBLASLt descriptors", error, described) from error
        except BaseException:
            self.close()
            raise

    def _layout(self, dtype: str, lay: LtLayout, batch: int) -> int:
        h = lt.matrix_layout_create(_DATA_TYPE[dtype], lay.rows, lay.cols, lay.ld)
        self.layouts.append(h)
        if batch > 1:
            lset, ldt = lt.matrix_layout_set_attribute, lt.get_matrix_layout_attribute_dtype
            _set(lset, ldt, h, _Lay.BATCH_COUNT, batch)
            _set(lset, ldt, h, _Lay.STRIDED_BATCH_OFFSET, lay.batch_stride)
        return h

    def heuristic(self, wanted: int) -> tuple[Any, int]:
        """Up to ``wanted`` of the heuristic's algorithms for this problem, best first: (results, count)."""
        pref = lt.matmul_preference_create()
        try:
            pset, pdt = lt.matmul_preference_set_attribute, lt.get_matmul_preference_attribute_dtype
            _set(pset, pdt, pref, _Pref.MAX_WORKSPACE_BYTES, WORKSPACE_BYTES)
            names = (_Pref.MIN_ALIGNMENT_A_BYTES, _Pref.MIN_ALIGNMENT_B_BYTES, _Pref.MIN_ALIGNMENT_C_BYTES,
                     _Pref.MIN_ALIGNMENT_D_BYTES)  # fmt: skip
            for attr, align in zip(names, self.alignments):
                _set(pset, pdt, pref, attr, align)
            results = lt.MatmulHeuristicResult(wanted)
            count = np.zeros(1, dtype=np.int32)
            lt.matmul_algo_get_heuristic(self.handle, self.desc, self.la, self.lb, self.lc, self.ld, pref,
                                         wanted, results.ptr, count.ctypes.data)  # fmt: skip
        finally:
            lt.matmul_preference_destroy(pref)
        return results, int(count[0])

    def result(self, results: Any, index: int) -> Any:
        """Entry ``index`` of a heuristic results array (a view: ``results`` must stay alive)."""
        return lt.MatmulHeuristicResult.from_ptr(results.ptr + index * lt.matmul_heuristic_result_dtype.itemsize, 1)

    def _choose(self) -> None:
        # the heuristic may check the epilogue pointers: aligned stand-ins until the first call sets them
        if self.bias_attr:
            self._set_pointer(_Desc.BIAS_POINTER, 0, 256)
        if self.aux_attr:
            self._set_pointer(_Desc.EPILOGUE_AUX_POINTER, 1, 256)
        results, count = self.heuristic(HEURISTIC_CANDIDATES)
        if count == 0:
            raise VendorError(
                f"matmul: cuBLASLt has no algorithm for {self.described} (alignments {self.alignments} bytes)",
                "CUBLAS_STATUS_NOT_SUPPORTED",
            )
        self._results = results  # keeps the algorithms' memory alive
        self.candidates = count
        self.select(0)

    def _set_pointer(self, attr: int, slot: int, ptr: int) -> None:
        self.slots[slot] = ptr
        lt.matmul_desc_set_attribute(self.desc, attr, self.slots.ctypes.data + 8 * slot, 8)

    def select(self, index: int) -> None:
        """Use the heuristic's candidate ``index`` (0 is its first pick)."""
        self.use(self.result(self._results, index))
        self.choice = index

    def use(self, algo: Any) -> None:
        """Use ``algo`` (a ``MatmulHeuristicResult`` checked for this problem, kept alive here): a tuned choice.
        A refusal of it at launch moves the plan to the heuristic's first pick (``_enqueue``)."""
        self.algo = algo
        self.algo_ptr = algo.ptr
        self.workspace_size = int(algo.workspace_size)
        self.choice = -1

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


def launch(plan: LtPlan, ptrs: Operands, alpha: float, beta: float, workspace: int, stream: int) -> None:
    """Enqueue the product on ``stream``; ``ptrs`` are our operands' device addresses (0: absent)."""
    with plan.lock:
        plan.scalars[0] = alpha
        plan.scalars[1] = beta
        try:
            if plan.bias_attr:  # the descriptor keeps the last bias (or bias-gradient) pointer
                bias = ptrs.bias or ptrs.bias_grad
                if plan.slots[0] != bias:
                    plan._set_pointer(_Desc.BIAS_POINTER, 0, bias)
            if plan.aux_attr and plan.slots[1] != ptrs.aux:
                plan._set_pointer(_Desc.EPILOGUE_AUX_POINTER, 1, ptrs.aux)
        except lt.cuBLASLtError as error:
            raise vendor_error("setting an epilogue pointer", error, plan.described) from error
        _enqueue(plan, ptrs, workspace, stream)


def _enqueue(plan: LtPlan, ptrs: Operands, workspace: int, stream: int) -> None:
    """One cublasLtMatmul per outer offset. A refusal (NOT_SUPPORTED) before anything was enqueued moves the
    plan to the heuristic's next candidate (its first after a tuned choice, ``LtPlan.use``) for good (the
    refusal is a property of the problem and the algorithm); any other status is raised as it is and changes
    nothing."""
    launched = 0
    try:
        for oa, ob, oc, od in plan.offsets:
            # its A is our b, its B our a (layouts.py)
            lt.matmul(plan.handle, plan.desc, plan.alpha_ptr, ptrs.b + oa, plan.la, ptrs.a + ob, plan.lb,
                      plan.beta_ptr, ptrs.c + oc, plan.lc, ptrs.d + od, plan.ld, plan.algo_ptr, workspace,
                      plan.workspace_size, stream)  # fmt: skip
            launched += 1
    except lt.cuBLASLtError as error:
        if launched == 0 and getattr(error, "status", None) == NOT_SUPPORTED and plan.choice + 1 < plan.candidates:
            plan.select(plan.choice + 1)
            _enqueue(plan, ptrs, workspace, stream)
            return
        raise vendor_error("cublasLtMatmul", error, plan.described) from error
