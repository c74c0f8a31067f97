"""cuBLASLt's algorithm space: configurations read, built, checked, varied and kept as JSON.

An algorithm (``cublasLtMatmulAlgo_t``, 64 opaque bytes) is an algorithm id with a configuration:
tile, stages, split-K count and reduction scheme, CTA swizzling, custom option, inner shape and
cluster shape (``MatmulAlgoConfigAttribute``). The heuristic returns a few; ``matmul_algo_get_ids``,
``matmul_algo_init`` and each id's capabilities (``MatmulAlgoCapAttribute``: tile and stage ids,
split-K support, reduction schemes, swizzling) open the rest, and ``matmul_algo_check`` says whether a
configuration runs this plan's problem and what workspace it needs. Every enum comes from
``nvmath.bindings.cublasLt``; the library is reached through ``bindings.lt`` (so tests can emulate it).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from . import bindings
from .bindings import WORKSPACE_BYTES, LtPlan

_Cfg = bindings.lt.MatmulAlgoConfigAttribute
_Cap = bindings.lt.MatmulAlgoCapAttribute
CONFIG = ("ID", "TILE_ID", "STAGES_ID", "SPLITK_NUM", "REDUCTION_SCHEME", "CTA_SWIZZLING", "CUSTOM_OPTION",
          "INNER_SHAPE_ID", "CLUSTER_SHAPE_ID")  # fmt: skip
SPLITK = (1, 2, 3, 4, 6, 8)
CLUSTERS = ("SHAPE_AUTO", "SHAPE_1x1x1", "SHAPE_2x1x1", "SHAPE_1x2x1", "SHAPE_2x2x1", "SHAPE_4x1x1", "SHAPE_1x4x1")
ALGO_BYTES = 64

Config = tuple[tuple[str, int], ...]  # (attribute name, value) in CONFIG order: hashable, JSON-able as a dict


def empty_result() -> Any:
    """A zeroed ``cublasLtMatmulHeuristicResult_t`` (the algorithm and its workspace size)."""
    lt = bindings.lt
    return lt.MatmulHeuristicResult.from_data(np.zeros(1, dtype=lt.matmul_heuristic_result_dtype))


def copied(result: Any) -> Any:
    """A copy of a heuristic result (algorithm and workspace size) in memory of its own."""
    lt = bindings.lt
    own = empty_result()
    ctypes.memmove(own.ptr, result.ptr, lt.matmul_heuristic_result_dtype.itemsize)
    return own


def algo_bytes(result: Any) -> bytes:
    return ctypes.string_at(result.ptr, ALGO_BYTES)


def _scalar(attr: int, dtype_of: Any) -> np.ndarray:
    return np.zeros(1, dtype=dtype_of(attr))


def config(result: Any) -> Config:
    """The configuration of the algorithm in ``result`` (attributes this library lacks are left out)."""
    lt = bindings.lt
    found = []
    written = np.zeros(1, np.uint64)
    for name in CONFIG:
        attr = getattr(_Cfg, name, None)
        if attr is None:
            continue
        buf = _scalar(attr, lt.get_matmul_algo_config_attribute_dtype)
        try:
            lt.matmul_algo_config_get_attribute(result.ptr, attr, buf.ctypes.data, buf.itemsize, written.ctypes.data)
        except lt.cuBLASLtError:
            continue
        found.append((name, int(buf[0])))
    return tuple(found)


def named(cfg: Config) -> str:
    """A configuration as people read it: ``id 21 tile 128x256 stages 64xAUTO splitk 1 swizzle 0 cluster 2x1x1``."""
    lt, values = bindings.lt, dict(cfg)

    def enum(kind: Any, value: int, prefix: str) -> str:
        try:
            return kind(value).name.removeprefix(prefix)
        except ValueError:
            return str(value)

    parts = [f"id {values.get('ID')}", f"tile {enum(lt.MatmulTile, values.get('TILE_ID', 0), 'TILE_')}",
             f"stages {enum(lt.MatmulStages, values.get('STAGES_ID', 0), 'STAGES_')}",
             f"splitk {values.get('SPLITK_NUM', 1)}"]  # fmt: skip
    if values.get("SPLITK_NUM", 1) > 1:
        parts.append(f"reduction {enum(lt.ReductionScheme, values.get('REDUCTION_SCHEME', 0), '')}")
    parts.append(f"swizzle {values.get('CTA_SWIZZLING', 0)}")
    parts.append(f"cluster {enum(lt.ClusterShape, values.get('CLUSTER_SHAPE_ID', 0), 'SHAPE_')}")
    return " ".join(parts)


def check(plan: LtPlan, result: Any) -> bool:
    """True when the algorithm in ``result`` runs ``plan``'s problem within the workspace; sets its workspace size."""
    lt = bindings.lt
    answer = empty_result()
    try:
        lt.matmul_algo_check(plan.handle, plan.desc, plan.la, plan.lb, plan.lc, plan.ld, result.ptr, answer.ptr)
    except lt.cuBLASLtError:
        return False
    need = int(answer.workspace_size)
    if need > WORKSPACE_BYTES:
        return False
    result.workspace_size = need
    return True


def build(plan: LtPlan, cfg: Config) -> Any | None:
    """The checked algorithm of configuration ``cfg`` for ``plan``, or None when the library refuses it."""
    lt, values = bindings.lt, dict(cfg)
    result = empty_result()
    try:
        lt.matmul_algo_init(plan.handle, *plan.types, values["ID"], result.ptr)
        for name, value in cfg:
            if name != "ID":
                attr = getattr(_Cfg, name)
                buf = np.array([value], dtype=lt.get_matmul_algo_config_attribute_dtype(attr))
                lt.matmul_algo_config_set_attribute(result.ptr, attr, buf.ctypes.data, buf.itemsize)
    except lt.cuBLASLtError:
        return None
    return result if check(plan, result) else None


def restore(plan: LtPlan, payload: dict) -> Any | None:
    """The algorithm a cache payload ``{"backend": "cublaslt", "data": hex, "config": {...}}`` holds, or None when
    the payload is malformed, its bytes no longer read as its configuration, or the library refuses it."""
    try:
        data = bytes.fromhex(payload["data"])
        expected = tuple((name, int(payload["config"][name])) for name in CONFIG if name in payload["config"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # OverflowError: int(Infinity)
        return None
    if len(data) != ALGO_BYTES:
        return None
    result = empty_result()
    ctypes.memmove(result.ptr, data, ALGO_BYTES)
    if config(result) != expected:
        return None
    return result if check(plan, result) else None


def payload(result: Any) -> dict:
    """The JSON a tuning-cache entry keeps of a cuBLASLt algorithm (``restore`` reads it back)."""
    return {"backend": "cublaslt", "config": dict(config(result)), "data": algo_bytes(result).hex()}


def _caps(plan: LtPlan, algo_id: int) -> dict[str, Any]:
    """An algorithm id's tiles, stages, split-K support, reduction schemes and swizzling support."""
    lt = bindings.lt
    probe = empty_result()
    lt.matmul_algo_init(plan.handle, *plan.types, algo_id, probe.ptr)
    written = np.zeros(1, np.uint64)
    found: dict[str, Any] = {}
    for name in ("TILE_IDS", "STAGES_IDS"):
        attr = getattr(_Cap, name)
        lt.matmul_algo_cap_get_attribute(probe.ptr, attr, 0, 0, written.ctypes.data)
        buf = np.zeros(max(int(written[0]) // 4, 1), np.uint32)
        lt.matmul_algo_cap_get_attribute(probe.ptr, attr, buf.ctypes.data, buf.nbytes, written.ctypes.data)
        found[name] = [int(x) for x in buf[: int(written[0]) // 4] if x]
    for name in ("SPLITK_SUPPORT", "REDUCTION_SCHEME_MASK", "CTA_SWIZZLING_SUPPORT"):
        attr = getattr(_Cap, name)
        buf = _scalar(attr, lt.get_matmul_algo_cap_attribute_dtype)
        lt.matmul_algo_cap_get_attribute(probe.ptr, attr, buf.ctypes.data, buf.itemsize, written.ctypes.data)
        found[name] = int(buf[0])
    return found


def algorithm_ids(plan: LtPlan, limit: int = 256) -> list[int]:
    """Every algorithm id the library has for ``plan``'s compute and data types."""
    try:
        return [int(i) for i in bindings.lt.matmul_algo_get_ids(plan.handle, *plan.types, limit)]
    except bindings.lt.cuBLASLtError:
        return []


def _changed(cfg: Config, **new: int) -> Config:
    return tuple((name, new.get(name, value)) for name, value in cfg)


def _caps_of(plan: LtPlan, algo_id: int, caps_cache: dict[int, dict]) -> dict[str, Any]:
    if algo_id not in caps_cache:
        try:
            caps_cache[algo_id] = _caps(plan, algo_id)
        except bindings.lt.cuBLASLtError:
            caps_cache[algo_id] = {"TILE_IDS": [], "STAGES_IDS": [], "SPLITK_SUPPORT": 0, "REDUCTION_SCHEME_MASK": 0,
                                   "CTA_SWIZZLING_SUPPORT": 0}  # fmt: skip
    return caps_cache[algo_id]


def _schemes(plan: LtPlan) -> list[Any]:
    """Split-K reduction schemes that keep the result's precision: for half results only the one that adds the
    partial products in the compute type (fp32); ``INPLACE`` and ``OUTPUT_TYPE`` add them in the output type."""
    scheme = bindings.lt.ReductionScheme
    if plan.problem.d_dtype in ("float16", "bfloat16"):
        return [scheme.COMPUTE_TYPE]
    return [scheme.INPLACE, scheme.COMPUTE_TYPE, scheme.OUTPUT_TYPE]


def neighbours(plan: LtPlan, cfg: Config, caps_cache: dict[int, dict]) -> Iterator[Config]:
    """Configurations one change away from ``cfg``: other stages, another tile, a split-K count (with each reduction
    scheme the id supports that keeps precision, ``_schemes``), CTA swizzling flipped, another cluster shape;
    unchecked."""
    values = dict(cfg)
    caps = _caps_of(plan, values["ID"], caps_cache)
    for stages in caps["STAGES_IDS"]:
        yield _changed(cfg, STAGES_ID=stages)
    for tile in caps["TILE_IDS"]:
        yield _changed(cfg, TILE_ID=tile)
    if caps["SPLITK_SUPPORT"]:
        schemes = [int(s) for s in _schemes(plan) if int(s) & caps["REDUCTION_SCHEME_MASK"]]
        for splitk in SPLITK:
            for scheme in schemes if splitk > 1 else [0]:
                yield _changed(cfg, SPLITK_NUM=splitk, REDUCTION_SCHEME=scheme)
    if caps["CTA_SWIZZLING_SUPPORT"]:
        yield _changed(cfg, CTA_SWIZZLING=1 - values.get("CTA_SWIZZLING", 0))
    if "CLUSTER_SHAPE_ID" in values:
        for name in CLUSTERS:
            yield _changed(cfg, CLUSTER_SHAPE_ID=int(getattr(bindings.lt.ClusterShape, name)))


def unseen_ids(plan: LtPlan, seen: Iterable[int], tiles: int = 4) -> Iterator[Config]:
    """For each algorithm id the heuristic did not return: its first ``tiles`` tiles, each with its first stages
    id; unchecked."""
    known = set(seen)
    caps_cache: dict[int, dict] = {}
    for algo_id in algorithm_ids(plan):
        if algo_id in known:
            continue
        probe = empty_result()
        try:
            bindings.lt.matmul_algo_init(plan.handle, *plan.types, algo_id, probe.ptr)
        except bindings.lt.cuBLASLtError:
            continue
        base, caps = config(probe), _caps_of(plan, algo_id, caps_cache)
        stages = (caps["STAGES_IDS"] or [0])[0]
        for tile in caps["TILE_IDS"][:tiles] or [0]:
            yield _changed(base, TILE_ID=tile, STAGES_ID=stages)
