"""The CUDA backend's own code on the CPU, with cuBLASLt emulated (``cublaslt_emulator``).

The plan layer, the CUDA backend's hot path and its cuBLASLt bindings run for real on NumPy arrays
posing as GPU arrays; only the library calls are emulated, from the descriptors, layouts, transposes,
batch strides, offsets and epilogue the backend hands to them. So the column-major A/B swap and the
epilogue mapping are checked on every CI run, over the fuzz's random problems.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import pytest
from device_memory import MEMORY, device, raw
from emulated_gpu import EmulatedFramework, Events, install, on_device
from test_fuzz import COUNTS, SEED, _run

import gemmbridge as gb
from gemmbridge.errors import VendorError

OK = pytest.importorskip("cuda.bindings.driver").CUresult.CUDA_SUCCESS


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    found = install(monkeypatch)
    yield found
    gb.clear_cache()


def test_fuzz_through_the_emulated_cuda_backend(gpu, summary_line: Callable[[str], None]) -> None:
    examples = int(os.environ.get("GEMMBRIDGE_FUZZ_EMULATED", 1500))
    _run(EmulatedFramework(), ("contiguous", "transposed", "row_strided", "col_strided", "offset", "negative"),
         examples, "emulated-cuda")  # fmt: skip
    summary_line(
        f"fuzz emulated-cuda: {COUNTS['emulated-cuda']} problems ({len(gpu[0].kernels.launches)} on the "
        f"skinny kernel), seed {SEED}, 0 failures"
    )
    assert gpu[0].matmuls > 0


def test_a_refused_algorithm_moves_the_plan_to_the_next_candidate(gpu) -> None:
    fake, _ = gpu
    fw = EmulatedFramework()
    a, b = fw.from_numpy(np.ones((4, 3)), "float32"), fw.from_numpy(np.ones((3, 5)), "float32")
    fake.refuse = {0}
    np.testing.assert_array_equal(gb.matmul(a, b), np.full((4, 5), 3.0))
    fake.refuse = set()
    before = fake.matmuls
    gb.matmul(a, b)
    assert fake.matmuls == before + 1  # no second refusal: the plan kept candidate 1


def test_any_other_vendor_error_changes_nothing(gpu, monkeypatch) -> None:
    """Only NOT_SUPPORTED moves to the next algorithm; an execution failure is raised and the plan keeps its pick."""
    fake, _ = gpu
    fw = EmulatedFramework()
    a, b = fw.from_numpy(np.ones((4, 3)), "float32"), fw.from_numpy(np.ones((3, 5)), "float32")
    gb.matmul(a, b)
    real_matmul = fake.matmul

    def fail(*args):  # type: ignore[no-untyped-def]
        raise fake.cuBLASLtError(13)  # CUBLAS_STATUS_EXECUTION_FAILED

    monkeypatch.setattr(fake, "matmul", fail)
    with pytest.raises(VendorError, match="cublasLtMatmul failed"):
        gb.matmul(a, b)
    monkeypatch.setattr(fake, "matmul", real_matmul)
    plan = next(iter(gb.plan.PLANS.plans.values()))
    assert [p.choice for p, _, _ in plan.state.plans.values()] == [0]


def test_a_failing_call_drops_its_own_workspace_before_it_raises(gpu, monkeypatch) -> None:
    """A call on a stream beyond the workspace table takes a workspace of its own, freed into its stream when the
    call drops it. A failing call kept it in its frame, alive as long as the caller kept the error, then freed from
    whichever thread collected it — maybe while that stream was being captured. It is dropped before the error
    propagates."""
    from gemmbridge.backends.cuda import workspace

    fake, _ = gpu
    fw = EmulatedFramework()
    a, b = fw.from_numpy(np.ones((4, 3)), "float32"), fw.from_numpy(np.ones((3, 5)), "float32")
    dropped: list[int] = []

    class Buffer:
        address = 1 << 20

        def __del__(self) -> None:
            dropped.append(self.address)

    monkeypatch.setattr(workspace, "pointer", lambda view, ctx: (lambda buf: (buf, buf.address))(Buffer()))

    def fail(*args):  # type: ignore[no-untyped-def]
        raise fake.cuBLASLtError(13)  # CUBLAS_STATUS_EXECUTION_FAILED

    monkeypatch.setattr(fake, "matmul", fail)
    try:
        gb.matmul(a, b)
    except VendorError as error:
        kept = error  # the caller holds the error, and with it the traceback's frames
        assert dropped == [1 << 20], "the workspace outlived its failed call"
    else:
        raise AssertionError("the call did not fail")
    del kept


def test_threads_share_one_plan_and_compute_right(gpu) -> None:
    """Plans serve every thread: one plan, one vendor plan, each thread's alpha and bias its own."""
    fw = EmulatedFramework()
    rng = np.random.default_rng(0)
    a64, b64 = rng.standard_normal((16, 8)), rng.standard_normal((8, 12))
    a, b = fw.from_numpy(a64, "float64"), fw.from_numpy(b64, "float64")
    errors: list[str] = []

    def work(i: int) -> None:
        bias64 = np.full(12, float(i))
        bias = fw.from_numpy(bias64, "float64")
        for _ in range(50):
            got = gb.matmul(a, b, alpha=float(i), bias=bias)
            if not np.allclose(got, i * (a64 @ b64) + bias64):
                errors.append(f"thread {i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert gb.cache_size() == 1


def test_autotune_with_out_times_into_scratch_and_keeps_the_faster_candidate(gpu, monkeypatch) -> None:
    """A plan first made by an out= call is tuned too, and tuning never writes out (here out is c, in place)."""
    from gemmbridge.backends.cuda import timer

    fake, _ = gpu
    monkeypatch.setattr(timer, "driver", Events(lambda: {0: 1.0, 1: 0.5}[fake.calls[-1][0]], lambda: fake.matmuls))
    fw = EmulatedFramework()
    rng = np.random.default_rng(1)
    a64, b64, c64 = rng.standard_normal((6, 4)), rng.standard_normal((4, 5)), rng.standard_normal((6, 5))
    a, b, c = (fw.from_numpy(x, "float64") for x in (a64, b64, c64))
    gb.set_autotune(True)
    try:
        gb.matmul(a, b, c=c, alpha=0.5, out=c)
    finally:
        gb.set_autotune(False)
    np.testing.assert_allclose(c, 0.5 * a64 @ b64 + c64, rtol=1e-12)
    out_address = c.__array_interface__["data"][0]
    assert {index for index, _ in fake.calls[:-1]} == {0, 1}, "both candidates timed"
    assert [d for _, d in fake.calls].count(out_address) == 1, "tuning wrote out"
    assert fake.calls[-1] == (1, out_address)  # the faster candidate made the real call


@pytest.mark.parametrize("layout", ["negative", "row_strided", "col_strided", "offset", "transposed", "contiguous"])
def test_autotune_scratch_holds_everything_a_candidate_writes_for_any_out_layout(gpu, monkeypatch, rng, layout):
    """Candidates are timed into scratch laid out like the call's outputs. An out= with its rows reversed is written
    through an M×N temporary: its scratch must hold the whole result (it was sized from out's upper byte only, 64
    bytes for a 4096-byte result, and the candidates wrote past it)."""
    from gemmbridge import tuning
    from gemmbridge.backends.cuda import timer

    fake, _ = gpu
    monkeypatch.setattr(timer, "driver", Events(lambda: {0: 1.0, 1: 0.5}[fake.calls[-1][0]], lambda: fake.matmuls))
    monkeypatch.setattr(tuning, "enabled", False)  # tuned every time, never served from another layout's entry
    fw = EmulatedFramework()
    a64, b64 = rng.standard_normal((64, 8)), rng.standard_normal((8, 16))
    a, b = fw.from_numpy(a64, "float32"), fw.from_numpy(b64, "float32")
    parent, out, inside = fw.out_view((64, 16), "float32", layout)
    gb.set_autotune(True)
    try:
        assert gb.matmul(a, b, out=out) is out
    finally:
        gb.set_autotune(False)
    ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(np.asarray(parent)[~inside]).all(), "written outside out"
    assert {index for index, _ in fake.calls[:-1]} == {0, 1}, "both candidates timed"
    d = fake.calls[-1][1]  # the real call's D (out, or the temporary it is written through)
    assert all((timed - d) % 256 == 0 for _, timed in fake.calls[:-1]), "timed with another alignment of D"


def test_fuzz_autotuned_with_every_out_layout(gpu, monkeypatch) -> None:
    """The fuzz's problems with autotune on and out= in every layout (reversed rows included): each plan's
    candidates are timed into scratch first, and every emulated access is fenced (``device_memory``)."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    from test_fuzz import check_problem, problems

    from gemmbridge import tuning
    from gemmbridge.backends.cuda import timer

    fake, _ = gpu
    launches = lambda: fake.matmuls + len(fake.kernels.launches)  # noqa: E731 (cuBLASLt's and the skinny kernel's)
    monkeypatch.setattr(timer, "driver", Events(lambda: 1.0 - 0.5 * fake.calls[-1][0], launches))
    monkeypatch.setattr(tuning, "enabled", False)
    fw, rng = EmulatedFramework(), np.random.default_rng(SEED)
    layouts = ("contiguous", "transposed", "row_strided", "col_strided", "offset", "negative")
    drawn = problems(layouts).flatmap(lambda p: st.sampled_from(("none", *layouts)).map(lambda out: {**p, "out": out}))

    @seed(SEED)
    @settings(max_examples=int(os.environ.get("GEMMBRIDGE_FUZZ_AUTOTUNED", 150)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(drawn)
    def fuzz(p: dict) -> None:
        gb.clear_cache()  # a new plan, tuned, for every problem
        check_problem(fw, p, rng)

    gb.set_autotune(True)
    try:
        fuzz()
    finally:
        gb.set_autotune(False)
    assert len({index for index, _ in fake.calls}) == 2, "both candidates timed and used"


def test_the_emulated_device_refuses_an_access_outside_its_allocations() -> None:
    """The suite's fence (``device_memory``): a byte written past an allocation is found by the guard check, and an
    emulated access reaching past one is refused before it is made; each fault is kept for the test's teardown."""
    x = MEMORY.allocate(64)
    end = x.ctypes.data + 64
    raw(end, np.uint8, 1)[0] ^= 0xFF  # a write no bounds check saw
    with pytest.raises(AssertionError, match="0 guard bytes before it and 1 after it"):
        MEMORY.check()
    raw(end, np.uint8, 1)[0] ^= 0xFF
    MEMORY.check()
    with pytest.raises(AssertionError, match="D reaches 8 bytes at .* outside every allocation"):
        device(end - 4, np.float32, 2, "D")
    device(end - 8, np.float32, 2, "D")[:] = 1.0  # the last 8 bytes: inside
    assert len(MEMORY.take_faults()) == 2 and MEMORY.take_faults() == []


@pytest.mark.parametrize("failing", ["create", "matmul_desc_create", "matmul_desc_set_attribute"])
def test_library_failures_outside_the_product_are_vendor_errors(gpu, monkeypatch, failing) -> None:
    """Handle creation, descriptor creation and the bias-pointer setter raise VendorError naming the problem."""
    fake, _ = gpu
    fw = EmulatedFramework()
    a, b, bias = (fw.from_numpy(np.ones(s), "float32") for s in ((4, 3), (3, 5), (5,)))
    real = getattr(fake, failing)

    def fail(*args):  # type: ignore[no-untyped-def]
        if failing != "matmul_desc_set_attribute" or args[1] == fake.MatmulDescAttribute.BIAS_POINTER:
            raise fake.cuBLASLtError(7)  # CUBLAS_STATUS_INVALID_VALUE
        return real(*args)

    monkeypatch.setattr(fake, failing, fail)
    with pytest.raises(VendorError, match=r"failed with CUBLAS_STATUS_INVALID_VALUE for (cuda:0|float32)"):
        gb.matmul(a, b, bias=bias)


def test_misaligned_aux_is_refused_before_anything_is_written(gpu) -> None:
    fw = EmulatedFramework()
    a, b = fw.from_numpy(np.ones((4, 3)), "float32"), fw.from_numpy(np.ones((3, 8)), "float32")
    buf = fw.from_numpy(np.zeros(4 * 8 + 1), "float32")
    aux = buf[1:].reshape(4, 8)  # 4 bytes past an aligned address
    out = fw.poisoned((4, 8), "float32")
    with pytest.raises(gb.OptionError, match="16-byte aligned"):
        gb.matmul(a, b, epilogue="gelu_aux", aux=aux, out=out)
    assert np.isnan(out).all()


def test_dgelu_with_k_1_is_refused_on_cuda(gpu) -> None:
    fw = EmulatedFramework()
    a, b, aux = (fw.from_numpy(np.ones(s), "float32") for s in ((4, 1), (1, 8), (4, 8)))
    with pytest.raises(gb.OptionError, match="needs K ≥ 2"):
        gb.matmul(a, b, epilogue="dgelu", aux=aux)


def test_a_capturing_stream_gets_no_graph_replay_and_a_capture_workspace(gpu, monkeypatch) -> None:
    from gemmbridge.backends import cuda
    from gemmbridge.backends.cuda import graphs, workspace

    _, view = gpu
    monkeypatch.setattr(cuda, "MAX_FLOPS", 1 << 40)  # small: graph replay would apply outside a capture
    monkeypatch.setattr(view.call, "capturing", True)
    monkeypatch.setattr(workspace, "capture_id", lambda stream: 5)
    monkeypatch.setattr(workspace, "_captures", {})
    monkeypatch.setattr(graphs.GraphCache, "replay", lambda *a: pytest.fail("replayed inside a capture"))
    monkeypatch.setattr(graphs.GraphCache, "record", lambda *a: pytest.fail("recorded inside a capture"))
    fw = EmulatedFramework()
    a, b = fw.from_numpy(np.ones((4, 3)), "float32"), fw.from_numpy(np.ones((3, 5)), "float32")
    for _ in range(3):
        np.testing.assert_array_equal(gb.matmul(a, b), np.full((4, 5), 3.0))
    assert list(workspace._captures) == [(0, 0, 5)]


def test_graphs_switched_off_are_neither_recorded_nor_replayed(gpu, monkeypatch, graph_switch, rng) -> None:
    """A small call met again with the same pointers is recorded as a graph on its second sighting and replayed from
    then on. With ``set_graphs(False)`` every call is launched directly: nothing recorded, and a graph recorded
    before is not replayed. Switched on again, that graph is replayed and new calls are recorded again."""
    from gemmbridge.backends import cuda
    from gemmbridge.backends.cuda import graphs

    fake, _ = gpu
    captured, replayed, destroyed = [], [], []

    def capture(device, enqueue):  # type: ignore[no-untyped-def]
        captured.append(enqueue)
        return len(captured), enqueue

    def launch(graph, stream):  # type: ignore[no-untyped-def]
        replayed.append(graph[0])
        graph[1](stream)

    monkeypatch.setattr(cuda, "MAX_FLOPS", 1 << 40)  # small: recorded when graphs are on
    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(graphs, "_launch", launch)
    monkeypatch.setattr(graphs, "_doomed", [])  # these stand-in graphs must never reach the real driver
    monkeypatch.setattr(graphs.driver, "cuGraphExecDestroy", destroyed.append)
    monkeypatch.setattr(graphs.driver, "cuThreadExchangeStreamCaptureMode", lambda mode: (OK, mode))
    graph_switch(True)
    a64, b64, other64 = rng.standard_normal((6, 4)), rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    a, b, other = on_device(a64), on_device(b64), on_device(other64)
    out = on_device(np.full((6, 5), np.nan))

    def calls(y, y64, count: int) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
        """Each call's (products computed, graphs captured, graphs replayed), its result checked."""
        found = []
        for _ in range(count):
            before = fake.matmuls, len(captured), len(replayed)
            out[...] = np.nan
            assert gb.matmul(a, y, out=out) is out
            np.testing.assert_allclose(out, a64 @ y64, rtol=1e-12)
            found.append((fake.matmuls - before[0], len(captured) - before[1], len(replayed) - before[2]))
        return found

    eager, recorded, replay = (1, 0, 0), (1, 1, 1), (1, 0, 1)
    assert calls(b, b64, 3) == [eager, recorded, replay]
    graph_switch(False)
    assert calls(b, b64, 3) + calls(other, other64, 3) == [eager] * 6
    graph_switch(True)
    assert calls(b, b64, 1) == [replay]
    assert calls(other, other64, 3) == [eager, recorded, replay]
    gb.clear_cache()
    assert sorted(destroyed) == [1, 2]


def test_a_signature_is_captured_once_and_closed_graphs_are_destroyed_once(monkeypatch) -> None:
    """Two threads that both missed the replay record the same call: the second launches the first's graph
    (a second capture would replace it and leak it). Graphs of a closed cache are destroyed exactly once."""
    from gemmbridge.backends.cuda import graphs

    captured, launched, destroyed = [], [], []

    def capture(self, device, enqueue):  # type: ignore[no-untyped-def]
        captured.append(object())
        return captured[-1], len(captured)

    monkeypatch.setattr(graphs.GraphCache, "_capture", capture)
    monkeypatch.setattr(graphs, "_launch", lambda graph, stream: launched.append(graph))
    monkeypatch.setattr(graphs.driver, "cuGraphExecDestroy", destroyed.append)
    monkeypatch.setattr(graphs.driver, "cuThreadExchangeStreamCaptureMode", lambda mode: (OK, mode))
    monkeypatch.setattr(graphs, "_doomed", [])
    cache = graphs.GraphCache()
    results = [cache.record(("sig",), 0, 7, lambda stream: None) for _ in range(3)]
    assert results == [False, True, True] and len(captured) == 1 and launched == [(captured[0], 1)] * 2
    assert cache.replay(("sig",), 7) and len(launched) == 3
    cache.close()
    assert not cache.replay(("sig",), 7)
    threads = [threading.Thread(target=graphs.drain) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert destroyed == captured


def test_calls_cycling_through_more_signatures_than_graphs_stop_capturing(monkeypatch) -> None:
    """Five signatures in turn against a table of four graphs: each would be captured again on every call. Once
    GRAPHS_PER_PLAN graphs in a row were evicted unreplayed, the cache records no more (the calls run eagerly),
    also when one hot signature is replayed between the churning ones (which is never evicted); a cache whose
    graphs are replayed keeps recording, also when a one-off signature comes now and then."""
    from gemmbridge.backends.cuda import graphs

    captured: list[tuple] = []  # the signature of each capture

    def capture(self, device, enqueue):  # type: ignore[no-untyped-def]
        enqueue(0)
        return object(), len(captured)

    monkeypatch.setattr(graphs.GraphCache, "_capture", capture)
    monkeypatch.setattr(graphs, "_launch", lambda graph, stream: None)
    monkeypatch.setattr(graphs.driver, "cuGraphExecDestroy", lambda graph: None)
    monkeypatch.setattr(graphs.driver, "cuThreadExchangeStreamCaptureMode", lambda mode: (OK, mode))
    monkeypatch.setattr(graphs, "_doomed", [])  # these stand-in graphs must never reach the real drain
    caches = {name: graphs.GraphCache() for name in ("cycling", "steady", "churning", "mostly steady")}

    def call(cache: graphs.GraphCache, sig: tuple) -> None:
        if not cache.replay(sig, 0):
            cache.record(sig, 0, 0, lambda stream: captured.append(sig))

    try:
        signatures = [(i,) for i in range(graphs.GRAPHS_PER_PLAN + 1)]
        for _ in range(20):
            for sig in signatures:
                call(caches["cycling"], sig)
        assert caches["cycling"].broken and len(captured) == 2 * graphs.GRAPHS_PER_PLAN  # none in the calls after
        captured.clear()
        for _ in range(20):
            for sig in signatures[:-1]:
                call(caches["steady"], sig)
        assert not caches["steady"].broken and len(captured) == graphs.GRAPHS_PER_PLAN
        captured.clear()
        for i in range(200):
            call(caches["churning"], ("hot",))
            call(caches["churning"], signatures[i % len(signatures)])
        assert caches["churning"].broken and len(captured) <= 2 * graphs.GRAPHS_PER_PLAN + 1
        assert captured.count(("hot",)) == 1  # replayed, so never the one evicted
        for episode in range(10):  # a one-off signature now and then among replayed ones: keeps recording
            for _ in range(5):
                for sig in signatures[:-1]:
                    call(caches["mostly steady"], sig)
            call(caches["mostly steady"], ("one-off", episode))
            call(caches["mostly steady"], ("one-off", episode))
        assert not caches["mostly steady"].broken
    finally:
        for cache in caches.values():
            cache.close()
