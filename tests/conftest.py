"""Framework fixtures: one object per (framework, device) that makes, views and reads back arrays.

Tests build every operand from float64 numpy data through a ``Framework`` (``gemmbridge.testing``) and
read results back with ``to_numpy64``, so one suite runs unchanged on numpy, torch, JAX and CuPy, on the
CPU and (marked ``gpu``) on CUDA. What this machine lacks (``testing.Unavailable``) skips the test.

After the run, a few lines say why tests were skipped (GPU tests without a GPU, missing packages) and what the
fuzz tests covered (``summary_line``), below the progress dots rather than among them.
"""

from __future__ import annotations

import contextlib
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator

import numpy as np
import pytest

from gemmbridge.testing import DTYPES, LAYOUTS, NP_DTYPES, Framework, Unavailable

__all__ = ["DTYPES", "LAYOUTS", "NP_DTYPES", "Framework"]


@contextlib.contextmanager
def _skip_if_unavailable() -> Iterator[None]:
    try:
        yield
    except Unavailable as missing:
        pytest.skip(str(missing))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """A fixture that asks for what this machine lacks (``testing.Unavailable``) skips the test."""
    with _skip_if_unavailable():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test that asks for what this machine lacks (``testing.Unavailable``) is skipped."""
    with _skip_if_unavailable():
        return (yield)


FRAMEWORKS = [
    pytest.param(("numpy", "cpu"), id="numpy-cpu"),
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("jax", "cpu"), id="jax-cpu"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("cupy", "cuda"), id="cupy-cuda", marks=pytest.mark.gpu),
    pytest.param(("jax", "cuda"), id="jax-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=FRAMEWORKS)
def fw(request: pytest.FixtureRequest) -> Framework:
    """Every (framework, device) pair; unavailable ones are skipped."""
    return Framework(*request.param)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """A torch device for the training tests: the CPU, and (marked ``gpu``) CUDA, skipped without it."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return str(request.param)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random data for each test, reproducible from the test's id."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="session")
def _private_tuning_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests' tuning cache lives in a temporary directory, never the user's."""
    import os

    before = os.environ.get("GEMMBRIDGE_CACHE_DIR")
    os.environ["GEMMBRIDGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("tuning-cache"))
    yield
    if before is None:
        del os.environ["GEMMBRIDGE_CACHE_DIR"]
    else:
        os.environ["GEMMBRIDGE_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Each test starts with an empty problem cache."""
    import gemmbridge

    gemmbridge.clear_cache()


@pytest.fixture(autouse=True)
def _emulated_memory_intact() -> Iterator[None]:
    """A test whose emulated GPU work reached outside an allocation fails, also where gemmbridge set the error aside
    (``device_memory``: guard bytes around every allocation, bounds on every emulated access)."""
    yield
    memory = sys.modules.get("device_memory")  # imported by the emulated-GPU tests only
    if memory is not None:
        faults = memory.MEMORY.take_faults()
        assert not faults, "\n".join(faults)


@pytest.fixture
def graph_switch(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """``gemmbridge.set_graphs`` for one test: the switch and the setting kept for the CUDA backend's loading are
    restored after it."""
    from gemmbridge import plan

    graphs = pytest.importorskip("gemmbridge.backends.cuda.graphs")
    monkeypatch.setattr(graphs, "enabled", graphs.enabled)
    monkeypatch.setattr(plan, "_settings", dict(plan._settings))
    return plan.set_graphs


@pytest.fixture
def tf32_start() -> Iterator[Callable[[str, bool], None]]:
    """Sets torch's TF32 setting for float32 matmuls through one of its APIs (``legacy``: ``allow_tf32``;
    ``fp32_precision``: the matmul's; ``global fp32_precision``: the backends' one under a matmul's "none"); torch's
    settings are restored after the test. torch's CPU build has the same flags."""
    torch = pytest.importorskip("torch")
    matmul, backends = torch.backends.cuda.matmul, torch.backends
    saved = matmul.fp32_precision, backends.fp32_precision

    def start(api: str, enabled: bool) -> None:
        if api == "legacy":
            matmul.allow_tf32 = enabled
        elif api == "fp32_precision":
            matmul.fp32_precision = "tf32" if enabled else "ieee"
        else:
            matmul.fp32_precision, backends.fp32_precision = "none", "tf32" if enabled else "ieee"

    yield start
    matmul.fp32_precision, backends.fp32_precision = saved


def cuda_torch():
    """torch, for a test that needs a CUDA GPU through it (skipped without torch or a GPU)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


SUMMARY = pytest.StashKey[list[str]]()
SKIP_REASONS_SHOWN = 5


@pytest.fixture
def summary_line(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``summary_line(text)``: ``text`` is printed after the run, with the skip summary (never among the dots)."""
    return request.config.stash.setdefault(SUMMARY, []).append


def _cuda_seen() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def skip_summary(reports: list[pytest.TestReport | pytest.CollectReport], cuda: bool) -> list[str]:
    """Why tests were skipped, in a few lines: the GPU tests at once when there is no GPU, then the commonest
    other reasons."""
    if not reports:
        return []
    gpu = [r for r in reports if "gpu" in getattr(r, "keywords", ())] if not cuda else []  # a module: no keywords
    reasons = Counter(_skip_reason(r) for r in reports if r not in gpu)
    parts = [f"{len(gpu)} GPU tests (marked gpu): no CUDA GPU here"] if gpu else []
    parts += [f"{count} other tests" if gpu else f"{count} tests" for count in [sum(reasons.values())] if count]
    lines = [f"{len(reports)} skipped: " + ", ".join(parts)]
    for reason, count in reasons.most_common(SKIP_REASONS_SHOWN):
        lines.append(f"  {count:5}  {reason}")
    if len(reasons) > SKIP_REASONS_SHOWN:
        rest = sum(count for _, count in reasons.most_common()[SKIP_REASONS_SHOWN:])
        lines.append(f"  {rest:5}  for {len(reasons) - SKIP_REASONS_SHOWN} other reasons (pytest -rs lists each)")
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The fuzz tests' lines, then why tests were skipped."""
    lines = config.stash.get(SUMMARY, []) + skip_summary(terminalreporter.stats.get("skipped", []), _cuda_seen())
    for line in lines:
        terminalreporter.write_line(line)
