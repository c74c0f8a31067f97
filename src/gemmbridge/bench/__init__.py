"""``gemmbridge bench``: gemmbridge against the framework's matmul, a Triton kernel, CuPy and nvmath-python.

Modules, one job each:

- ``presets``: the shapes (square sweep, LLM projections, LoRA, small; skinny: LoRA's GEMMs in a layer's layouts and
  decode steps, with the ≥ 80 % of copy bandwidth target) and ``MxNxK[xBATCH]`` parsing
- ``data``: dtypes and tolerances, random inputs, the float64 reference, relative error
- ``candidates``: one small class per candidate: ``available()`` → reason or None, ``prepare(a, b)`` → callable
- ``triton_gemm``: the project's own tuned Triton GEMM (the "write our own kernel" alternative)
- ``timing``: device time (``do_bench`` / CUDA events / ``perf_counter``), host µs per call, GPU µs per op from a
  replayed CUDA graph
- ``peaks``: the card's measured peak per dtype, its device-to-device copy bandwidth, a shape's share of it
- ``runner``: checks every candidate, then times them interleaved, shape by shape
- ``report`` / ``plot``: the table, the JSON document and the PNG

Optional packages (rich, matplotlib, triton, cupy, nvmath) are imported only when used.
"""

from .runner import BenchOptions, run

__all__ = ["BenchOptions", "run"]
