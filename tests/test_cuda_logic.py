"""The CUDA backend's pure-Python logic, checked without a GPU (driver calls replaced by a recorder)."""

from __future__ import annotations

import gc
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytest.importorskip("nvmath.bindings.cublasLt")
real_driver = pytest.importorskip("cuda.bindings.driver")

from nvmath.bindings import cublas  # noqa: E402

from gemmbridge.backends.cuda import bindings, graphs  # noqa: E402

OK = real_driver.CUresult.CUDA_SUCCESS


def test_compute_types_are_cublas_compute_types_not_the_library_wide_enum():
    """The seed project's lesson: a wrong enum (nvmath.ComputeType) made every call NOT_SUPPORTED."""
    assert bindings.compute_types("float32", False)[0] == cublas.ComputeType.COMPUTE_32F
    assert bindings.compute_types("float32", True)[0] == cublas.ComputeType.COMPUTE_32F_FAST_TF32
    assert bindings.compute_types("bfloat16", True)[0] == cublas.ComputeType.COMPUTE_32F  # TF32 is for fp32 only
    assert bindings.compute_types("float16", False)[0] == cublas.ComputeType.COMPUTE_32F  # fp32 accumulation
    assert bindings.compute_types("float64", False)[0] == cublas.ComputeType.COMPUTE_64F
    assert int(cublas.ComputeType.COMPUTE_32F) == 68  # cublasComputeType_t, not cudaComputeType (4)


class RecordingDriver:
    """Stands in for cuda.bindings.driver: records calls, returns success. ``exposed`` lists the calls CUDA deems
    unsafe during another thread's global-mode capture that were made outside thread-local mode (``graphs.isolated``):
    each would have failed and invalidated that capture. With ``own_capture`` this thread has a capture of its own
    under way (begun in the global mode, torch's default): then only the relaxed mode lets such a call through."""

    CUresult = real_driver.CUresult
    CUstream_flags = real_driver.CUstream_flags
    CUstreamCaptureMode = real_driver.CUstreamCaptureMode
    UNSAFE = (
        "cuStreamCreate",
        "cuGraphInstantiate",
        "cuGraphDestroy",
        "cuGraphExecDestroy",
        "cuEventSynchronize",
        "cuGraphUpload",
        "cuLibraryLoadData",
        "cuLibraryGetKernel",
        "cuKernelSetAttribute",
    )

    def __init__(self) -> None:
        self.calls: list = []
        self.exposed: list[str] = []
        self.uploaded: set = set()  # graph executables on the device: launching one is then a plain stream operation
        self.mode = real_driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL  # the thread's, as CUDA starts
        self.own_capture = False

    def cuThreadExchangeStreamCaptureMode(self, mode):  # type: ignore[no-untyped-def]
        before, self.mode = self.mode, mode
        return OK, before

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        results = {"cuStreamCreate": 11, "cuStreamEndCapture": "graph", "cuGraphInstantiate": 77,
                   "cuLibraryLoadData": "library", "cuLibraryGetKernel": 55}  # fmt: skip

        def call(*args):  # type: ignore[no-untyped-def]
            self.calls.append((name, *args))
            unsafe = name in self.UNSAFE or (name == "cuGraphLaunch" and args[0] not in self.uploaded)  # uploads first
            modes = real_driver.CUstreamCaptureMode
            forbidding = (modes.CU_STREAM_CAPTURE_MODE_GLOBAL,) if not self.own_capture else (
                modes.CU_STREAM_CAPTURE_MODE_GLOBAL, modes.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)  # fmt: skip
            if unsafe and self.mode in forbidding:
                self.exposed.append(name)
            if name == "cuGraphUpload":
                self.uploaded.add(args[0])
            return (OK, results[name]) if name in results else (OK,)

        return call


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingDriver]:
    fake = RecordingDriver()
    monkeypatch.setattr(graphs, "driver", fake)
    monkeypatch.setattr(graphs, "_graph_launch_v2", None)
    monkeypatch.setattr(graphs, "_capture_streams", {})
    monkeypatch.setattr(graphs, "_stream_objects", {})
    monkeypatch.setattr(fake, "CUstream", lambda handle: handle, raising=False)
    monkeypatch.setattr(graphs, "_doomed", [])
    yield fake
    gc.collect()  # the test's graph caches hand their executables to _doomed: destroy them with the fake
    graphs.drain()
    assert fake.exposed == [], "unsafe during another thread's capture, and not isolated"
    assert fake.mode == real_driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL, "the thread's mode not restored"


def launch(cache: graphs.GraphCache, signature: tuple, enqueue) -> bool:  # type: ignore[no-untyped-def]
    """What cuda.run does on a stream that is not being captured: replay, else record."""
    return cache.replay(signature, 5) or cache.record(signature, 0, 5, enqueue)


def test_first_sighting_runs_eagerly_second_captures_third_replays(driver: RecordingDriver):
    cache, enqueued = graphs.GraphCache(), []
    signature = (1, 2, 3, 4, 0, 1.0, 0.0, 5, 9)
    assert launch(cache, signature, enqueued.append) is False  # caller enqueues eagerly
    assert driver.calls == [] and enqueued == []
    assert launch(cache, signature, enqueued.append) is True
    names = [c[0] for c in driver.calls]
    assert names == ["cuStreamCreate", "cuStreamBeginCapture", "cuStreamEndCapture", "cuGraphInstantiate",
                     "cuGraphDestroy", "cuGraphUpload", "cuGraphLaunch"]  # fmt: skip
    assert enqueued == [11]  # captured on the private stream, launched on the caller's (5)
    assert driver.calls[-1][-1] == 5
    driver.calls.clear()
    assert launch(cache, signature, enqueued.append) is True
    assert [c[0] for c in driver.calls] == ["cuGraphLaunch"] and enqueued == [11]


def test_a_failing_capture_ends_the_capture_and_falls_back_to_eager_calls(driver: RecordingDriver):
    cache = graphs.GraphCache()

    def refuse(stream: int) -> None:
        raise RuntimeError("vendor refused")

    assert launch(cache, (7,), refuse) is False
    assert launch(cache, (7,), refuse) is False  # the caller then calls eagerly (and raises)
    assert [c[0] for c in driver.calls][-2:] == ["cuStreamEndCapture", "cuGraphDestroy"]
    assert cache.broken and not cache.execs
    driver.calls.clear()
    assert launch(cache, (7,), refuse) is False and driver.calls == []  # no more captures
    assert graphs._capture_lock.acquire(blocking=False)  # released after the failure
    graphs._capture_lock.release()


def test_graph_table_is_bounded_and_destroys_what_it_drops(driver: RecordingDriver):
    cache = graphs.GraphCache()
    for i in range(graphs.GRAPHS_PER_PLAN + 3):
        for _ in range(2):
            launch(cache, (i,), lambda s: None)
    assert len(cache.execs) == graphs.GRAPHS_PER_PLAN
    graphs.drain()  # an evicted graph waits for a drain, as a closed cache's do
    assert sum(c[0] == "cuGraphExecDestroy" for c in driver.calls) == 3
    cache.close()
    assert not cache.execs


def test_closing_never_destroys_executables_until_drained(driver: RecordingDriver, monkeypatch):
    """A plan dropped while the caller's stream is capturing must not destroy graphs inside that capture."""
    monkeypatch.setattr(graphs, "_doomed", [])
    cache = graphs.GraphCache()
    for _ in range(2):
        launch(cache, (1,), lambda s: None)
    driver.calls.clear()
    cache.close()
    assert driver.calls == [] and len(graphs._doomed) == 1
    graphs.drain()
    assert [c[0] for c in driver.calls] == ["cuGraphExecDestroy"] and graphs._doomed == []


def test_a_driver_error_in_graph_launch_is_a_vendor_error(driver: RecordingDriver, monkeypatch):
    from gemmbridge.errors import VendorError

    cache = graphs.GraphCache()
    for _ in range(2):
        launch(cache, (1,), lambda s: None)
    monkeypatch.setattr(driver, "cuGraphLaunch", lambda *args: (real_driver.CUresult.CUDA_ERROR_INVALID_HANDLE,),
                        raising=False)  # fmt: skip
    with pytest.raises(VendorError, match="cuGraphLaunch failed"):
        cache.replay((1,), 5)


@pytest.mark.parametrize("own_capture", [False, True], ids=["another_threads_capture", "the_callers_own_capture"])
def test_loading_a_kernel_leaves_a_global_capture_alone(own_capture: bool, driver: RecordingDriver, monkeypatch):
    """The project's kernels are loaded on a plan's first call: a tuning may make one while another thread captures
    in CUDA's global mode, and a plan first met while the caller's own stream is being captured (``torch.cuda.graph``
    without a warm-up) loads its kernel inside that capture, where the thread-local mode still forbids the load (it
    failed, invalidated the capture and marked the kernel broken). Loading a library and raising a kernel's
    shared-memory limit touch no stream: they are made in the relaxed mode."""
    from gemmbridge.backends.cuda.kernels import compiler, launch

    monkeypatch.setattr(launch, "driver", driver)
    monkeypatch.setattr(launch, "_kernels", {})
    monkeypatch.setattr(launch, "_ready", set())
    monkeypatch.setattr(compiler, "cubin", lambda config, target, fresh=False: b"cubin")
    driver.own_capture = own_capture

    class Big:
        kernel_name = b"gemmbridge_test"
        smem_bytes = 100 * 1024  # over the default limit: the attribute is set

    big = Big()
    assert launch.kernel(big, 0, "sm_90") == 55
    assert [c[0] for c in driver.calls] == ["cuLibraryLoadData", "cuLibraryGetKernel", "cuKernelSetAttribute"]
    assert driver.exposed == []
    exchanges, exchange = [], driver.cuThreadExchangeStreamCaptureMode
    counted = lambda mode: exchanges.append(mode) or exchange(mode)  # noqa: E731
    monkeypatch.setattr(driver, "cuThreadExchangeStreamCaptureMode", counted)
    driver.calls.clear()
    assert launch.kernel(big, 0, "sm_90") == 55  # loaded and ready: no driver call, not even a mode exchange
    assert driver.calls == [] and exchanges == []
    assert launch.kernel(big, 1, "sm_90") == 55  # another device: its shared-memory limit is set, once
    assert [c[0] for c in driver.calls] == ["cuKernelSetAttribute"] and len(exchanges) == 2


def test_a_timer_that_fails_to_start_restores_the_threads_capture_mode(driver: RecordingDriver, monkeypatch):
    """A tuning's timer isolates the thread for its whole life; when making its events fails, the thread's capture
    mode is restored before the error leaves (it stayed thread-local while the error was held, and was later restored
    by whichever thread collected it)."""
    from gemmbridge.backends.cuda import timer
    from gemmbridge.errors import VendorError

    made = iter([(OK, "start"), (real_driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY,)])
    monkeypatch.setattr(timer, "driver", driver)
    monkeypatch.setattr(driver, "cuEventCreate", lambda flags: next(made), raising=False)
    with pytest.raises(VendorError, match="cuEventCreate") as raised:
        with timer.Timer(None, 1.0, 0.0, 0, 5, 0):  # type: ignore[arg-type]
            pytest.fail("the timer started")
    assert raised.value.__traceback__ is not None  # the error is still held, as a caller's handler holds it
    assert driver.mode == real_driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL
    assert [c[0] for c in driver.calls] == ["cuEventDestroy"]  # the start event made, destroyed


def test_settings_made_before_the_cuda_backend_loads_are_applied_when_it_loads(graph_switch, monkeypatch):
    """``set_graphs``, ``set_autotune`` and ``set_kernels`` before the backend is loaded reach it when it loads (the
    plan layer loads it on the first GPU problem); once it is loaded, they reach it at once."""
    from gemmbridge import plan
    from gemmbridge.backends.cuda import autotune, kernels

    monkeypatch.setattr(plan, "_cuda_backend", None)
    monkeypatch.setattr(graphs, "enabled", True)
    monkeypatch.setattr(autotune, "enabled", False)
    monkeypatch.setattr(kernels, "mode", "auto")
    graph_switch(False)
    plan.set_autotune(True)
    plan.set_kernels("off")
    assert (graphs.enabled, autotune.enabled, kernels.mode) == (True, False, "auto")  # not loaded: not yet
    assert plan.cuda() is sys.modules["gemmbridge.backends.cuda"]
    assert (graphs.enabled, autotune.enabled, kernels.mode) == (False, True, "off")
    graph_switch(True)
    assert graphs.enabled


def test_a_setting_made_while_the_cuda_backend_loads_is_the_one_it_keeps(monkeypatch):
    """One thread loads the backend and applies an earlier ``set_graphs(True)``; another calls ``set_graphs(False)``
    meanwhile: the backend ends with False, the last setting made (the loading's stale value used to overwrite it)."""
    import threading
    import types

    from gemmbridge import backends, plan

    applied, entered, release = [], threading.Event(), threading.Event()

    class Switch:  # the backend's graphs module: its first setting waits until the other thread has had its turn
        def __setattr__(self, name: str, value: object) -> None:
            applied.append(value)
            if len(applied) == 1:
                entered.set()
                release.wait(10)
            object.__setattr__(self, name, value)

    switch = Switch()
    monkeypatch.setattr(backends, "cuda", types.SimpleNamespace(graphs=switch), raising=False)
    monkeypatch.setattr(plan, "_cuda_backend", None)
    monkeypatch.setattr(plan, "_settings", {("graphs", "enabled"): True})
    loading = threading.Thread(target=plan.cuda)
    loading.start()
    assert entered.wait(10)
    setting = threading.Thread(target=plan.set_graphs, args=(False,))
    setting.start()
    setting.join(0.5)  # done by now unless it waits for the loading to finish
    release.set()
    loading.join(10)
    setting.join(10)
    assert switch.enabled is False and plan._settings == {("graphs", "enabled"): False} and applied[0] is True


SWITCHES = [("GEMMBRIDGE_GRAPHS", "graphs", "enabled", "1"), ("GEMMBRIDGE_PDL", "kernels.launch", "pdl", "0")]


@pytest.mark.parametrize("variable, module, attribute, default", SWITCHES)
def test_switches_are_read_from_the_environment(variable: str, module: str, attribute: str, default: str):
    """GEMMBRIDGE_GRAPHS (graph recording, on by default) and GEMMBRIDGE_PDL (programmatic dependent launch, off by
    default): "0" off, "1" on, unset the default, anything else refused when the backend is imported."""
    name = f"gemmbridge.backends.cuda.{module}"
    assert getattr(importlib.import_module(name), attribute) == (os.environ.get(variable, default) == "1")
    code = f"import {name} as switched; print(switched.{attribute})"
    env = {k: v for k, v in os.environ.items() if k != variable}
    settings = ({**env, variable: "0"}, {**env, variable: "1"}, env, {**env, variable: "yes"})
    found = [subprocess.run([sys.executable, "-c", code], env=variables, capture_output=True, text=True, timeout=120)
             for variables in settings]  # fmt: skip
    assert all(run.returncode == 0 for run in found[:3]), [run.stderr for run in found[:3]]
    assert [run.stdout.strip() for run in found[:3]] == ["False", "True", str(default == "1")]
    assert found[3].returncode != 0 and f"{variable} must be '0' or '1', not 'yes'" in found[3].stderr
