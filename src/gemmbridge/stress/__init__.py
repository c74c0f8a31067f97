"""``gemmbridge stress``: the leak and soak test.

Runs N calls (default 1000; ``--iterations 100000`` for a soak) of a seeded random mix of problems
(``draw``), with a failing call every fifth call, which must raise a ``gemmbridge.errors.GemmError`` and
leave ``out`` untouched. Results are checked against a float64 NumPy reference on a sample: all of the
first 50 calls, then every 10th (``check``).

The calls repeat a set of 2000 problems (``--problems``; 2000 valid and 2000 failing ones), each with
fresh data on every call, as an application repeats its shapes; 2000 is more than the plan cache holds, so
plans are evicted and rebuilt all through the run. Before the counted calls, one pass makes each problem
of the set once, so that the per-shape caches of the frameworks and libraries (JAX compiles and keeps an
executable per new shape; CUDA loads kernels lazily) have met the whole set before memory is first sampled.
On CUDA, 5000 priming calls follow (``--prime-calls``): host RSS grows by a few hundred MiB over the first
few thousand problems while CUDA loads kernels and the libraries build their per-kernel state.
``--problems 0`` draws a new problem for every call: the widest variety, but those caches then keep
growing (on CUDA, lazy module loading: 30,000 new problems grew host RSS by 16 MiB under gemmbridge and
22 MiB under ``torch.matmul`` with eager module loading —
``benchmarks/results/2026-11-26-h200-soak-rss-control.json``), so host RSS is reported, not judged.

Memory is sampled after a warm-up (10 % of the counted calls), every tenth of the run and at the end
(``memory``). It fails (exit status 1) when:

- the framework allocator's live bytes grew at all (torch ``memory_allocated``, CuPy pool ``used_bytes``);
- device memory in use (``cudaMemGetInfo``: total − free) grew by more than ``--device-tolerance-mb`` (64);
- host RSS grew by more than ``--rss-tolerance-mb`` (8), where it is judged (``options.Plan.rss_unjudged``);
- the plan cache ever held more than ``gemmbridge.ops.PLAN_CACHE_SIZE`` problems;
- any checked result is wrong, any valid call raised, or any failing call did not raise a GemmError.

The seed is printed; ``--seed`` replays the same sequence.

Under compute-sanitizer (memcheck), use the short mode with torch arrays and torch's caching allocator off,
so that each tensor is its own ``cudaMalloc`` and an out-of-bounds access is caught at the buffer's edge
(``--report-api-errors no``: cuda-bindings probes absent driver symbols, which memcheck would list)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --report-api-errors no \\
        --error-exitcode 9 python -m gemmbridge.cli stress --short --device cuda --frameworks torch

``--short`` is 200 calls of dims up to 64, every result checked, no pass over the set and no priming (a few
minutes under memcheck); its host RSS growth is reported, not judged. Any memcheck error makes
compute-sanitizer exit 9; the stress test's own failures exit 1.

Modules: ``options`` (what is asked, resolved into a ``Plan``), ``draw`` (the mix), ``check`` (one call
made and judged), ``memory`` (samples and tolerances), ``runner`` (the run), ``report`` (its output).
"""

from .options import StressOptions
from .runner import run

__all__ = ["StressOptions", "run"]
