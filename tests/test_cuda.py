"""CUDA-only behaviour: streams, graph capture, alignment, devices, TF32, caches, frameworks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import gemmbridge as gb  # noqa: E402

pytestmark = pytest.mark.gpu


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def rand(*shape, dtype=torch.float32, device="cuda"):
    return torch.randn(*shape, dtype=dtype, device=device)


# float64: cuBLASLt's GELU epilogue in double precision is accurate to about 1e-10 (measured 6e-11)
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-9}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_odd_offset_views(dtype, offset):
    """Views starting off the allocation's alignment must give correct results."""
    base_a = rand(40 * 33 + offset, dtype=dtype)
    base_b = rand(33 * 24 + offset, dtype=dtype)
    a = base_a[offset:].view(40, 33)
    b = base_b[offset:].view(33, 24)
    out_base = torch.full((40 * 24 + offset,), float("nan"), dtype=dtype, device="cuda")
    out = out_base[offset:].view(40, 24)
    bias = rand(24 + offset, dtype=dtype)[offset:]
    result = gb.matmul(a, b, bias=bias, out=out)
    assert result is out
    assert not torch.isnan(out).any()
    assert rel_err(out, a.double() @ b.double() + bias.double()) < TOL[dtype]


def test_non_default_stream_orders_after_producer():
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        a = rand(512, 256)
        b = rand(256, 384)
        a.mul_(2.0)  # pending work on the side stream that matmul must see
        result = gb.matmul(a, b)
    side.synchronize()
    assert rel_err(result, a.double() @ b.double()) < 1e-5


def test_streams_run_concurrently_with_separate_workspaces():
    from gemmbridge.backends.cuda import workspace

    streams = [torch.cuda.Stream() for _ in range(4)]
    pairs = [(rand(300, 200), rand(200, 100)) for _ in streams]
    results = []
    for stream, (a, b) in zip(streams, pairs):
        stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
        with torch.cuda.stream(stream):
            results.append(gb.matmul(a, b))
    torch.cuda.synchronize()
    for (a, b), r in zip(pairs, results):
        assert rel_err(r, a.double() @ b.double()) < 1e-5
    assert workspace.count() >= len(streams)


def test_cuda_graph_capture_and_replay():
    a = rand(128, 96)
    b = rand(96, 80)
    bias = rand(80)
    gb.matmul(a, b, bias=bias, epilogue="relu")  # warm the plan outside capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gb.matmul(a, b, bias=bias, epilogue="relu")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gb.matmul(a, b, bias=bias, epilogue="relu")
    for _ in range(3):
        a.copy_(rand(128, 96))
        b.copy_(rand(96, 80))
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = torch.relu(a.double() @ b.double() + bias.double())
        assert rel_err(static_out, ref) < 1e-5


def test_graph_capture_of_a_new_problem():
    """A plan built during capture (cache miss inside the graph) also works."""
    a = rand(33, 17)
    b = rand(17, 45)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gb.matmul(a, b, transpose_b=False)
    a.copy_(rand(33, 17))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, a.double() @ b.double()) < 1e-5


def test_tf32_follows_flag_and_argument():
    a = rand(1024, 1024)
    b = rand(1024, 1024)
    ref = a.double() @ b.double()
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = rel_err(gb.matmul(a, b), ref)
        torch.backends.cuda.matmul.allow_tf32 = True
        flagged = rel_err(gb.matmul(a, b), ref)
        overridden = rel_err(gb.matmul(a, b, allow_tf32=False), ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    asked = rel_err(gb.matmul(a, b, allow_tf32=True), ref)
    assert exact < 1e-5 and overridden < 1e-5
    assert 1e-5 < flagged < 3e-3 and 1e-5 < asked < 3e-3


def test_cache_is_reused_and_bounded():
    gb.clear_cache()
    a, b = rand(64, 32), rand(32, 16)
    for _ in range(5):
        gb.matmul(a, b)
    assert gb.cache_size() == 1
    from gemmbridge import ops

    for n in range(ops.PLAN_CACHE_SIZE + 20):
        gb.matmul(rand(2, 3), rand(3, n + 1))
    assert gb.cache_size() == ops.PLAN_CACHE_SIZE


def test_no_synchronization_inside_capture_for_every_dtype():
    """Synchronizing during capture is an error, so a clean capture proves no sync."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        a, b = rand(64, 48, dtype=dtype), rand(48, 40, dtype=dtype)
        c = rand(64, 40, dtype=dtype)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gb.matmul(a, b, c=c, alpha=0.5, beta=2.0, epilogue="gelu")
        graph.replay()
        torch.cuda.synchronize()
        ref = torch.nn.functional.gelu(0.5 * (a.double() @ b.double()) + 2.0 * c.double(), approximate="tanh")
        assert rel_err(out, ref) < TOL[dtype]


def test_large_batched_broadcast_and_transposes():
    a = rand(4, 1, 96, 64, dtype=torch.bfloat16)
    b = rand(3, 80, 64, dtype=torch.bfloat16)
    out = gb.matmul(a, b, transpose_b=True)
    assert out.shape == (4, 3, 96, 80)
    assert rel_err(out, a.double() @ b.double().mT) < 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_another_device_than_current():
    with torch.cuda.device(0):
        a = rand(50, 40, device="cuda:1")
        b = rand(40, 30, device="cuda:1")
        out = gb.matmul(a, b)
    assert out.device == torch.device("cuda:1")
    assert rel_err(out, a.double() @ b.double()) < 1e-5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_two_devices_is_an_error():
    with pytest.raises(gb.DeviceError, match="cuda:0.*cuda:1"):
        gb.matmul(rand(4, 4, device="cuda:0"), rand(4, 4, device="cuda:1"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_same_problems_alternate_between_two_gpus(framework):
    """The same problems go to GPU 0 and GPU 1 in turn, each call made while the other GPU is current:
    plans, workspaces and replayed graphs must be those of the operands' device."""
    if framework == "cupy":
        cupy = pytest.importorskip("cupy")

        def on(device, x):
            with cupy.cuda.Device(device):
                return cupy.asarray(x.cpu().numpy())

        current, device_of = cupy.cuda.Device, lambda x: x.device.id
    else:
        on, current, device_of = (lambda device, x: x.to(f"cuda:{device}")), torch.cuda.device, lambda x: x.device.index
    for _round in range(3):
        for device in (0, 1):
            for m, n, k in ((8, 16, 24), (300, 200, 130)):  # a small one (replayed as a graph) and a larger one
                a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
                ref = torch.relu(a.double() @ b.double() + bias.double()).cuda()
                a, b, bias = on(device, a), on(device, b), on(device, bias)
                for _repeat in range(3):  # same pointers again: the graph path captures, then replays
                    with current(1 - device):
                        out = gb.matmul(a, b, bias=bias, epilogue="relu", allow_tf32=False)
                        assert torch.cuda.current_device() == 1 - device  # left as the caller set it
                    assert device_of(out) == device
                    got = torch.as_tensor(out.get() if framework == "cupy" else out.cpu()).cuda()
                    assert rel_err(got, ref) < 1e-5


def test_cpu_and_gpu_mixed_is_an_error():
    with pytest.raises(gb.DeviceError, match="CPU and GPU"):
        gb.matmul(rand(4, 4), torch.randn(4, 4))


def test_cupy_on_its_current_stream():
    cupy = pytest.importorskip("cupy")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        a = cupy.random.standard_normal((70, 50), dtype=cupy.float32)
        b = cupy.random.standard_normal((50, 30), dtype=cupy.float32).T.copy().T  # column-major
        out = gb.matmul(a, b)
        ref = a.astype(cupy.float64) @ b.astype(cupy.float64)
    stream.synchronize()
    assert isinstance(out, cupy.ndarray)
    assert float(cupy.linalg.norm(out - ref) / cupy.linalg.norm(ref)) < 1e-5


def test_jax_gpu_arrays():
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jax has no GPU backend")
    import numpy as np

    rng = np.random.default_rng(0)
    host = [rng.standard_normal(shape).astype(np.float32) for shape in ((60, 40), (40, 20), (20,))]
    a, b, bias = (jax.device_put(x) for x in host)
    out = gb.matmul(a, b, bias=bias, epilogue="relu")
    assert isinstance(out, jax.Array) and next(iter(out.devices())).platform == "gpu"
    ref = np.maximum(host[0].astype(np.float64) @ host[1].astype(np.float64) + host[2], 0.0)
    assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-5


def test_small_problem_graph_replay_follows_data_and_scalars():
    """Repeated pointers replay a captured graph; new data and new alpha still give fresh results."""
    gb.clear_cache()
    a, b = rand(32, 24), rand(24, 16)
    out = torch.empty(32, 16, device="cuda")
    for i in range(8):
        a.copy_(rand(32, 24))
        b.copy_(rand(24, 16))
        alpha = 1.0 if i < 5 else -0.5
        out.fill_(float("nan"))
        gb.matmul(a, b, alpha=alpha, out=out)
        torch.cuda.synchronize()
        assert rel_err(out, alpha * (a.double() @ b.double())) < 1e-5
    (plan,) = gb.plan.PLANS.plans.values()
    (plan_and_graphs,) = plan.state.plans.values()
    assert plan_and_graphs[1].execs, "a repeated small call should have been captured"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_out", [False, True], ids=["", "out"])
def test_autotune_times_every_candidate_and_keeps_a_working_one(dtype, with_out, monkeypatch):
    """Tuning runs (also for a plan first made by an out= call) and never writes the caller's out or c. The tuning
    cache is off: the other parametrization of this test stores a choice for the same problem."""
    import statistics

    from gemmbridge import tuning
    from gemmbridge.backends.cuda import autotune

    monkeypatch.setattr(tuning, "enabled", False)
    timed = []
    real = autotune.tune
    monkeypatch.setattr(autotune, "tune", lambda *args: timed.append(real(*args)) or timed[-1])
    gb.clear_cache()
    gb.set_autotune(True)
    try:
        a, b, c = rand(512, 256, dtype=dtype), rand(256, 384, dtype=dtype), rand(512, 384, dtype=dtype)
        expected = 0.5 * (a.double() @ b.double()) + c.double()
        out = gb.matmul(a, b, c=c, alpha=0.5, out=c if with_out else None, allow_tf32=False)
        assert rel_err(out, expected) < TOL[dtype]
    finally:
        gb.set_autotune(False)
    (plan,) = gb.plan.PLANS.plans.values()
    ((lt_plan, _, _),) = plan.state.plans.values()
    (tuned,) = timed
    assert len(tuned.timings) == lt_plan.candidates and 0 <= lt_plan.choice < lt_plan.candidates
    finalists, rounds = list(tuned.rounds), list(zip(*tuned.rounds.values()))  # the first pick first
    assert finalists[0].startswith("heuristic 0:") and len(rounds) == autotune.ROUNDS
    decision = autotune.decide(rounds)
    assert finalists[decision.chosen].startswith(f"heuristic {lt_plan.choice}:"), "the plan runs the choice"
    assert tuned.chosen_ms == statistics.median(tuned.rounds[finalists[decision.chosen]]) < float("inf")
    assert lt_plan.choice == 0 or decision.gain > max(autotune.MIN_GAIN, decision.noise)


def test_two_captured_graphs_have_their_own_workspaces_and_replay_concurrently(monkeypatch):
    from gemmbridge.backends.cuda import workspace

    seen: list[int] = []
    real = workspace._capture_pointer
    monkeypatch.setattr(
        workspace, "_capture_pointer", lambda view, ctx: seen.append(real(view, ctx)[1]) or (None, seen[-1])
    )
    a, b = rand(256, 256), rand(256, 256)
    graphs, outs = [], []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # both on torch's shared default capture stream
            outs.append(gb.matmul(a, b, allow_tf32=False))
        graphs.append(g)
    assert len(seen) == 2 and seen[0] != seen[1], "two graphs share a workspace"
    assert workspace._captures == {}, "a captured workspace is held: CUDA graph trees refuse that"
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(3):
        a.copy_(rand(256, 256))
        torch.cuda.synchronize()
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
        torch.cuda.synchronize()
        for out in outs:
            assert rel_err(out, a.double() @ b.double()) < 1e-5


def test_plans_evicted_during_a_capture_destroy_nothing_inside_it(monkeypatch):
    monkeypatch.setattr(gb.plan.PLANS, "size", 4)
    gb.clear_cache()
    for n in range(1, 9):  # small problems: each gets a replayed graph outside the capture
        x = rand(8, n)
        for _ in range(3):
            gb.matmul(x, rand(n, 8))
    g = torch.cuda.CUDAGraph()
    a = rand(16, 16)
    with torch.cuda.graph(g):
        outs = [gb.matmul(a, rand(16, n + 1)) for n in range(8)]  # 8 new plans: evictions inside the capture
    g.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(o).all() for o in outs)
    gb.clear_cache()


def test_negative_bit_is_refused_on_cuda():
    z = torch.complex(rand(3, 4), rand(3, 4))
    with pytest.raises(gb.OperandTypeError, match="negative bit"):
        gb.matmul(z.conj().imag, rand(4, 5))


def test_calls_never_wait_for_the_gpu():
    """With the GPU busy for ~100 ms, every kind of call returns at once: nothing synchronizes."""
    import os

    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        pytest.skip("without torch's caching allocator every free is a cudaFree, which waits for the GPU")

    import gemmbridge.torch as gt

    a, b = rand(1024, 1024, dtype=torch.bfloat16), rand(1024, 1024, dtype=torch.bfloat16)
    small_a, small_b, small_out = rand(64, 64), rand(64, 64), rand(64, 64)
    layer = gt.MLP(256, 512, device="cuda")
    x = rand(64, 256, dtype=torch.float32).requires_grad_()
    calls = {
        "large": lambda: gb.matmul(a, b),
        "small, replayed graph": lambda: gb.matmul(small_a, small_b, out=small_out),
        "gelu_aux": lambda: gb.matmul(a, b, transpose_b=True, epilogue="gelu_aux"),
        "MLP forward and backward": lambda: layer(x).sum().backward(),
    }
    for name, call in calls.items():
        for _ in range(3):
            call()  # plans, graphs and allocator blocks made
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time
        call()
        still_busy = not torch.cuda.current_stream().query()  # had the call waited, the sleep would be over
        torch.cuda.synchronize()
        assert still_busy, f"{name}: the call waited for the GPU"


def _own_streams(count: int) -> tuple[list, list]:
    """``count`` distinct CUDA streams as torch streams, and their handles (torch's pool has 32 streams per priority:
    ``torch.cuda.Stream()`` hands the same ones to threads 0 and 32)."""
    from cuda.bindings import driver

    torch.cuda.init()  # the driver calls below need the primary context current on this thread
    torch.cuda.synchronize()
    flags = driver.CUstream_flags.CU_STREAM_NON_BLOCKING
    created = [driver.cuStreamCreate(flags) for _ in range(count)]
    assert all(result == driver.CUresult.CUDA_SUCCESS for result, _ in created), created[:2]
    handles = [handle for _, handle in created]
    streams = [torch.cuda.ExternalStream(int(h)) for h in handles]
    assert len({s.cuda_stream for s in streams}) == count
    return streams, handles


def test_captures_on_64_streams_each_in_its_own_thread(graph_switch):
    """64 threads, each on its own stream, warm up (plans, workspaces) and capture a matmul in thread-local mode, one
    capture at a time, while the others keep warming up. More streams than the workspace table keeps: a workspace
    evicted from it was freed into its stream while that stream's thread captured (2 of 64 captures failed on an
    H200, 'operation not permitted when stream is capturing').

    gemmbridge's own graph recording is off (``set_graphs(False)``): entering ``torch.cuda.graph`` synchronizes the
    device, which CUDA refuses while any other thread captures — also gemmbridge's recording of another thread's
    warm-up call on its private stream (it failed so on an H200). That is the user's to avoid, not what this tests."""
    import threading

    from cuda.bindings import driver

    from gemmbridge.backends.cuda import workspace

    count = 64
    assert count > workspace.MAX_STREAMS
    graph_switch(False)
    streams, handles = _own_streams(count)
    lock, errors, checked = threading.Lock(), [], []
    # every random draw made here, before any capture: torch's default CUDA generator joins a capture under way,
    # and a draw from another thread meanwhile fails ('Offset increment outside graph capture')
    data = [(rand(48 + i % 8, 96), rand(96, 80), rand(48 + i % 8, 96)) for i in range(count)]
    torch.cuda.synchronize()

    def work(i: int) -> None:
        stream = streams[i]
        try:
            with torch.cuda.stream(stream):
                x, y, fresh = data[i]
                for _ in range(3):  # the same pointers: each launched directly (graphs off)
                    gb.matmul(x, y, allow_tf32=False)
                graph = torch.cuda.CUDAGraph()
                with lock, torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    out = gb.matmul(x, y, allow_tf32=False)
                x.copy_(fresh)
                graph.replay()
                stream.synchronize()
                checked.append(rel_err(out, x.double() @ y.double()))
        except BaseException as error:  # reported below, by thread
            errors.append(f"thread {i}: {error!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    for handle in handles:
        driver.cuStreamDestroy(handle)
    assert errors == [] and len(checked) == count and max(checked) < 1e-5, errors[:4]


def test_with_graphs_off_another_threads_device_synchronize_never_fails(graph_switch):
    """gemmbridge records a small call met again with the same pointers by a stream capture (on a private stream, in
    thread-local mode); while one lasts, CUDA refuses a device-wide synchronize from any other thread on that GPU
    ('operation not permitted when stream is capturing'). With ``set_graphs(False)`` nothing is captured: one thread
    synchronizes the device in a loop while another repeats small products of several layouts on the same pointers
    (each recorded, were graphs on), and neither sees an error; the results are right and no plan holds a graph."""
    import threading

    graph_switch(False)
    operands = [(rand(32 + 8 * i, 64), rand(64, 48 + 16 * i)) for i in range(4)]
    outs = [[torch.empty(x.shape[0], y.shape[1], device="cuda") for _ in range(2)] for x, y in operands]
    torch.cuda.synchronize()
    done, errors, synchronized = threading.Event(), [], []

    def synchronizing() -> None:
        try:
            while not done.is_set():
                torch.cuda.synchronize()
                synchronized.append(1)
        except BaseException as error:  # reported below
            errors.append(repr(error))

    thread = threading.Thread(target=synchronizing)
    thread.start()
    try:
        for _ in range(25):
            for (x, y), pair in zip(operands, outs):
                for out in pair:
                    out.fill_(float("nan"))
                    gb.matmul(x, y, out=out, allow_tf32=False)
    finally:
        done.set()
        thread.join()
    torch.cuda.synchronize()
    assert errors == [] and synchronized
    assert max(rel_err(out, x.double() @ y.double()) for (x, y), pair in zip(operands, outs) for out in pair) < 1e-5
    caches = [cache for plan in gb.plan.PLANS.plans.values() for _, cache, _ in plan.state.plans.values()]
    assert len(caches) == len(operands) and not any(cache.execs or cache.seen for cache in caches)


@pytest.mark.parametrize("workspaces", ["kept", "first_of_the_stream", "per_call"])
def test_tuning_and_graph_recording_leave_another_threads_global_capture_intact(workspaces, monkeypatch):
    """While one thread captures in CUDA's global mode (torch's default), another tunes a new plan (waiting for
    events, capturing host-bound candidates into graphs) and records a small call as a graph, with its stream's
    workspace kept from before, made during the capture, or made and freed by each call (the table full). Those
    calls, unsafe during a global capture, are made with the thread's capture mode thread-local: neither fails, and
    the capture stays valid (the GPU suite's run in 8 processes once saw it invalidated)."""
    import threading

    from gemmbridge import tuning
    from gemmbridge.backends.cuda import workspace

    monkeypatch.setattr(tuning, "enabled", False)
    capture_stream, side = torch.cuda.Stream(), torch.cuda.Stream()
    a, b = rand(1024, 512), rand(512, 768)
    x, y = rand(768, 512), rand(512, 640)  # a new plan, tuned during the capture
    s1, s2, small_out = rand(16, 16), rand(16, 16), rand(16, 16)
    with torch.cuda.stream(capture_stream):
        gb.matmul(a, b, allow_tf32=False)  # its plan made outside the capture
    with torch.cuda.stream(side):
        gb.matmul(s2, s1, allow_tf32=False)  # the side stream's workspace made
        reserve = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        del reserve  # torch's allocator serves the side thread from this block: no cudaMalloc during the capture
    torch.cuda.synchronize()
    if workspaces != "kept":  # the kept buffers stay alive in monkeypatch's hands
        monkeypatch.setattr(workspace, "_buffers", {})
        full = workspace.MAX_STREAMS if workspaces == "per_call" else 0
        monkeypatch.setattr(workspace, "_streams_kept", {torch.cuda.current_device(): full})
    begun, done, errors, results = threading.Event(), threading.Event(), [], {}

    def other() -> None:
        begun.wait(60)
        try:
            with torch.cuda.stream(side):
                results["tuned"] = gb.matmul(x, y, allow_tf32=False)
                for _ in range(3):  # the second call records a graph, the third replays it
                    gb.matmul(s1, s2, out=small_out, allow_tf32=False)
        except BaseException as error:  # reported below
            errors.append(repr(error))
        finally:
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    graph = torch.cuda.CUDAGraph()
    gb.set_autotune(True)
    try:
        with torch.cuda.stream(capture_stream):  # capture_begin directly: torch.cuda.graph would empty the cache
            graph.capture_begin(capture_error_mode="global")
            try:
                begun.set()
                assert done.wait(120), "the tuning thread did not finish"
                out = gb.matmul(a, b, allow_tf32=False)
            finally:
                graph.capture_end()
    finally:
        gb.set_autotune(False)
        thread.join()
    assert errors == []
    a.copy_(rand(*a.shape))
    capture_stream.wait_stream(torch.cuda.current_stream())  # the replay reads the new a
    with torch.cuda.stream(capture_stream):
        graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, a.double() @ b.double()) < 1e-5
    assert rel_err(results["tuned"], x.double() @ y.double()) < 1e-5
    assert rel_err(small_out, s1.double() @ s2.double()) < 1e-5


@pytest.mark.parametrize("layout", ["negative", "row_strided", "col_strided", "offset", "transposed"])
def test_autotune_with_a_cupy_out_view_writes_only_out(layout, monkeypatch):
    """Autotune's candidates write scratch laid out like the call's outputs: with reversed rows (CuPy's ``x[::-1]``,
    written through an M×N temporary) the scratch was sized from out's upper byte (64 bytes for 4096) and the
    candidates wrote past it. CuPy without its pool here: each array is its own allocation, for memcheck."""
    import numpy as np

    cupy = pytest.importorskip("cupy")
    from gemmbridge import tuning
    from gemmbridge.testing import Framework

    monkeypatch.setattr(tuning, "enabled", False)  # tuned every time, never served from another layout's entry
    pool = cupy.get_default_memory_pool()
    cupy.cuda.set_allocator(None)
    try:
        fw, rng = Framework("cupy", "cuda"), np.random.default_rng(7)
        a, b = fw.from_numpy(rng.standard_normal((64, 32)), "float32"), fw.from_numpy(rng.standard_normal((32, 16)),
                                                                                      "float32")  # fmt: skip
        parent, out, inside = fw.out_view((64, 16), "float32", layout)
        gb.clear_cache()
        gb.set_autotune(True)
        try:
            assert gb.matmul(a, b, out=out, allow_tf32=False) is out
        finally:
            gb.set_autotune(False)
        ref = fw.to_numpy64(a) @ fw.to_numpy64(b)
        np.testing.assert_allclose(cupy.asnumpy(out), ref, rtol=1e-4, atol=1e-4)
        assert np.isnan(cupy.asnumpy(parent)[~inside]).all(), "written outside out"
    finally:
        cupy.cuda.set_allocator(pool.malloc)
        gb.clear_cache()
