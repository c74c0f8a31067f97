"""pytest plugin for compute-sanitizer runs (``scripts/device_run.sh``, step ``sanitize``): CuPy without its memory
pool, so that each array is its own allocation and memcheck sees an access past one (the pool's larger blocks would
hide it)."""

from __future__ import annotations


def pytest_configure(config: object) -> None:
    try:
        import cupy
    except ImportError:
        return
    cupy.cuda.set_allocator(None)
