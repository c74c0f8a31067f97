"""The kernels (``skinny.cu``, ``dyonce.cu``, ``mask.cu``, including ``HEADERS``) compiled at run time by NVRTC,
cached on disk, loaded once per process.

Why NVRTC (through cuda-bindings) and not Triton: the kernel must launch from any framework's stream
(torch, CuPy, JAX) at the host cost of a ``cublasLtMatmul`` call or less. A compiled CUDA library
is launched with one ``cuLaunchKernel`` and a packed parameter block (``launch.py``), needs no
framework and is captured into CUDA graphs like any kernel; Triton's Python launcher costs tens of
µs per call and needs torch. The sources include no header but their own (``HEADERS``, handed to NVRTC by name), so
only ``libnvrtc`` is needed. What is compiled is a ``Build``: a source file, its kernel's name and its macros
(``config.Config`` for the skinny GEMM).

Cubins are kept under ``$GEMMBRIDGE_CACHE_DIR`` (else ``$XDG_CACHE_HOME/gemmbridge``, else
``~/.cache/gemmbridge``) in ``kernels/``, named by a hash of the source, the options and the NVRTC
version; written to a temporary file and renamed, so concurrent processes never see a partial one.
A cache that cannot be read or written is skipped (the kernel is compiled in memory).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Protocol

from .... import tuning

HEADERS = ("pipeline.cuh", "philox.cuh", "pdl.cuh")  # the headers the sources include, handed to NVRTC by name


class Build(Protocol):
    """One kernel to compile: its source file, its kernel's name, its macros and a short stable name."""

    @property
    def source_file(self) -> str: ...

    @property
    def kernel_name(self) -> bytes: ...

    @property
    def name(self) -> str: ...

    def defines(self) -> dict[str, int]: ...


@functools.cache
def source(file: str = "skinny.cu") -> str:
    return resources.files(__package__).joinpath(file).read_text()


@functools.cache
def source_digest() -> str:
    """A short hash of the skinny kernel's source and headers: tuning-cache entries made for another version are
    ignored."""
    return hashlib.sha256("".join(map(source, ("skinny.cu", *HEADERS))).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """``kernels/`` in gemmbridge's cache directory (the tuning cache's, ``tuning.cache_dir``)."""
    return Path(tuning.cache_dir()) / "kernels"


def options(build: Build, arch: str) -> list[bytes]:
    defines = [f"-D{name}={value}".encode() for name, value in build.defines().items()]
    return [f"-arch={arch}".encode(), b"-std=c++17", b"-default-device", *defines]


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    result = nvrtc.nvrtcVersion()
    _check(result[0], "nvrtcVersion")
    return int(result[1]), int(result[2])


def _check(status: object, what: str, log: str = "") -> None:
    from cuda.bindings import nvrtc

    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        from ....errors import VendorError

        raise VendorError(f"matmul: NVRTC {what} failed with {status!r}{': ' + log if log else ''}", str(status))


def compile_cubin(build: Build, arch: str) -> bytes:
    """NVRTC's cubin of ``build`` for ``arch`` (e.g. ``sm_90``); no disk cache."""
    return _compile(build, arch, "CUBIN")


def compile_ptx(build: Build, arch: str) -> str:
    """NVRTC's PTX of ``build`` for the virtual architecture ``arch`` (e.g. ``compute_90``): what tests read to check
    the kernels' order of instructions."""
    return _compile(build, arch, "PTX").rstrip(b"\0").decode()


def _compile(build: Build, arch: str, output: str) -> bytes:
    """NVRTC's ``output`` ("CUBIN" or "PTX") of ``build`` for ``arch``."""
    from cuda.bindings import nvrtc

    headers = [source(name).encode() for name in HEADERS]
    status, program = nvrtc.nvrtcCreateProgram(source(build.source_file).encode(), build.source_file.encode(),
                                               len(HEADERS), headers, [name.encode() for name in HEADERS])  # fmt: skip
    _check(status, "nvrtcCreateProgram")
    try:
        opts = options(build, arch)
        (status,) = nvrtc.nvrtcCompileProgram(program, len(opts), opts)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(program)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(program, log)
            _check(status, f"compiling {build.name} for {arch}", log.decode(errors="replace").strip())
        status, size = getattr(nvrtc, f"nvrtcGet{output}Size")(program)
        _check(status, f"nvrtcGet{output}Size")
        data = b" " * size
        _check(getattr(nvrtc, f"nvrtcGet{output}")(program, data)[0], f"nvrtcGet{output}")
        return data
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def cache_path(build: Build, arch: str) -> Path:
    digest = hashlib.sha256()
    sources = [source(name).encode() for name in (build.source_file, *HEADERS)]
    for part in (*sources, *options(build, arch), repr(nvrtc_version()).encode()):
        digest.update(part + b"\0")
    return cache_dir() / f"{build.name}-{arch}-{digest.hexdigest()[:16]}.cubin"


_lock = threading.Lock()


def cubin(build: Build, arch: str, fresh: bool = False) -> bytes:
    """The cubin from the disk cache, or compiled and stored there (``fresh``: compiled again, replacing a cached
    file the driver could not load)."""
    with _lock:
        path = cache_path(build, arch)
        try:
            data = path.read_bytes()
            if data[:4] == b"\x7fELF" and not fresh:
                return data
        except OSError:
            pass
        data = compile_cubin(build, arch)
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
                temporary = f.name
                f.write(data)
            os.replace(temporary, path)
        except OSError:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
        return data
