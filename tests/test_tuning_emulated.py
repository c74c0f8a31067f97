"""Tuning through the CUDA backend's own code with cuBLASLt emulated (``cublaslt_emulator``), with fake timings:
the dispatch rule, the tuning cache consulted at plan creation (and ignored when stale, foreign or off), the
exploration of cuBLASLt's algorithm space beyond the heuristic, and extra candidates from a source."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from cublaslt_emulator import STAGES, TILES
from device_memory import device
from emulated_gpu import EMULATED_DEVICE, Events, install, on_device
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gemmbridge as gb
from gemmbridge import tuning

pytest.importorskip("nvmath.bindings.cublasLt")

from gemmbridge.backends.cuda import autotune, explore, timer, tuning_cache  # noqa: E402

TILE_256, SWIZZLE = TILES[2], 5  # the emulator's word 5 is the CTA swizzle


@pytest.fixture
def gpu(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_files", {})
    monkeypatch.setattr(tuning, "enabled", True)
    found = install(monkeypatch)
    yield found
    gb.set_autotune(False)
    gb.clear_cache()


def operands(rng: np.random.Generator, m: int = 6, k: int = 4, n: int = 5) -> tuple[Any, Any, np.ndarray]:
    """Fresh a and b on the emulated device (256-byte aligned, as its allocations are) and their float64 product."""
    a64, b64 = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    return on_device(a64), on_device(b64), a64 @ b64


def lt_plan() -> Any:
    (plan,) = gb.plan.PLANS.plans.values()
    ((lt, _, launch),) = plan.state.plans.values()
    return lt, launch


def cache_entries() -> dict:
    return tuning_cache._file(0).entries()  # type: ignore[union-attr]


def no_timing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(timer, "Timer", lambda *a: pytest.fail("timed a plan the cache should have served"))


INF = float("inf")


@pytest.mark.parametrize(
    ("rounds", "chosen"),
    [
        ([[1.0, 0.97]] * 5, 1),  # 3 % faster in every round
        ([[1.0, 0.99]] * 5, 0),  # 1 %: under MIN_GAIN
        ([[1.0, 0.90], [1.0, 0.92], [1.0, 0.91], [1.0, 0.90], [1.0, 0.93]], 1),  # 9 %, noise 3 %
        ([[1.0, 0.91], [1.0, 0.96], [1.0, 1.01], [1.0, 0.96], [1.0, 0.91]], 0),  # 4 %, noise 10 %
        ([[0.9, 1.0], [1.0, 0.9]] * 2 + [[0.9, 1.0]], 0),  # whichever goes first looks 10 % faster: noise
        ([[1.0, 0.5, 0.9]] * 5, 1),  # the largest gain of several
        ([[1.0, 0.5]] * 4 + [[1.0, INF]], 0),  # failed in a round: never chosen
        ([[INF, 2.0, 3.0]] * 5, 1),  # the first pick refused: the fastest that ran
        ([[INF, INF]] * 5, 0),
    ],
    ids=["gain", "small-gain", "gain-over-noise", "gain-under-noise", "order-effect", "largest", "failed-once",
         "first-refused", "all-refused"],
)  # fmt: skip
def test_a_finalist_replaces_the_first_pick_only_by_a_gain_beyond_the_noise(rounds, chosen) -> None:
    assert autotune.MIN_GAIN == 0.02
    assert autotune.decide(rounds).chosen == chosen


class ClockedEvents(Events):
    """``Events`` timing a cost model: algorithm ``i`` costs ``ms[i]`` per call, 10 % less while the GPU is still at
    its idle boost clock (its first ``boost_ms`` of work), times ``noise[i](t)`` in its t-th timing (two event
    measurements each: an estimate, then the timing). ``log``: (algorithm, GPU ms before it) of each measurement."""

    def __init__(self, fake, ms: dict, boost_ms: float = 0.0, noise: dict | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(lambda: 0.0, lambda: fake.matmuls)
        self.fake, self.ms, self.boost_ms, self.noise = fake, ms, boost_ms, noise or {}
        self.gpu_ms, self.log, self.measured = 0.0, [], {i: 0 for i in ms}

    def cuEventElapsedTime(self, start, end):  # type: ignore[no-untyped-def]
        self.timed += 1
        i = self.fake.calls[-1][0]
        t, self.measured[i] = self.measured[i] // 2, self.measured[i] + 1
        per_call = self.ms[i] * (0.9 if self.gpu_ms < self.boost_ms else 1.0) * self.noise.get(i, lambda t: 1.0)(t)
        self.log.append((i, self.gpu_ms))
        self.gpu_ms += per_call * (self.count() - self.mark)
        return self.ok, per_call * (self.count() - self.mark)


def tuned_entry(gpu, monkeypatch, rng, events: ClockedEvents, exploring: bool) -> dict:  # type: ignore[no-untyped-def]
    """Tune a new plan (in process, or exploring) with ``events``; its tuning-cache entry."""
    monkeypatch.setattr(timer, "driver", events)
    monkeypatch.setattr(autotune, "exploring", exploring)
    gb.set_autotune(not exploring)
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    (entry,) = cache_entries().values()
    return entry


def alternating(t: int) -> float:
    return 0.95 if t % 2 == 0 else 1.05


@pytest.mark.parametrize("exploring", [False, True], ids=["autotune", "explore"])
def test_a_candidate_faster_only_in_noise_is_not_kept(gpu, monkeypatch, rng, exploring) -> None:
    """Every algorithm costs the same; algorithm 1's timings alternate 5 % fast and 5 % slow. Timed once (autotune)
    or kept at its best of three rounds (explore), it looked 5 % faster and was stored: a slower choice half the time.
    The first pick stays, and the entry records the noise."""
    events = ClockedEvents(gpu[0], {0: 1.0, 1: 1.0, 2: 1.0}, noise={1: alternating})
    entry = tuned_entry(gpu, monkeypatch, rng, events, exploring)
    assert entry["choice"]["config"]["ID"] == 0 and entry["timings"]["noise"] == pytest.approx(0.1)


WOBBLE = [1.0, 0.95, 1.0, 1.05, 1.0, 0.95]


@pytest.mark.parametrize(
    ("ms", "noise", "kept"),
    [(0.96, lambda t: WOBBLE[t % 6], 0), (0.90, lambda t: 0.99 + 0.02 * (t % 2), 1)],
    ids=["4%-under-5%-noise", "10%-over-1%-noise"],
)
def test_a_gain_is_kept_only_when_larger_than_the_noise(gpu, monkeypatch, rng, ms, noise, kept) -> None:
    """Algorithm 1 4 % faster with ±5 % noise is not kept (timed once, it was); 10 % faster with ±1 % is."""
    events = ClockedEvents(gpu[0], {0: 1.0, 1: ms}, noise={1: noise})
    assert tuned_entry(gpu, monkeypatch, rng, events, False)["choice"]["config"]["ID"] == kept


def test_timing_starts_at_steady_clocks_and_rotates_the_order(gpu, monkeypatch, rng) -> None:
    """The GPU's first 200 ms of work run at its boost clock, 10 % fast, steady as the power cap's clock is: the first
    pick runs WARMUP_MS before anything is timed, and until its time settles (a candidate timed first looked faster
    than it is); each final round starts with another finalist."""
    monkeypatch.setattr(timer, "WARMUP_MS", 500.0)
    monkeypatch.setattr(timer, "WARMUP_CHUNK_MS", 50.0)
    events = ClockedEvents(gpu[0], {0: 1.0, 1: 1.0}, boost_ms=200.0)
    order: list[str] = []
    timed = timer.Timer.time

    def time(self, candidate, budget_ms=timer.MEASURE_MS):  # type: ignore[no-untyped-def]
        order.append(candidate.name[:11])
        return timed(self, candidate, budget_ms)

    monkeypatch.setattr(timer.Timer, "time", time)
    entry = tuned_entry(gpu, monkeypatch, rng, events, False)
    assert all(gpu_ms >= 200.0 for i, gpu_ms in events.log if i == 1), "a candidate timed at the boost clock"
    assert entry["timings"] == {"first_ms": 1.0, "chosen_ms": 1.0, "noise": 0.0}
    finals = order[-2 * autotune.ROUNDS :]
    assert [finals[2 * r] for r in range(autotune.ROUNDS)] == ["heuristic 0", "heuristic 1"] * 2 + ["heuristic 0"]


@pytest.mark.parametrize(("ms", "chosen"), [({0: 1.0, 1: 0.5}, 1), ({0: 1.0, 1: 0.99}, 0)])
def test_autotune_stores_its_choice_and_a_new_plan_uses_it_without_timing(gpu, monkeypatch, rng, ms, chosen) -> None:
    fake, _ = gpu
    monkeypatch.setattr(timer, "driver", Events(lambda: ms[fake.calls[-1][0]], lambda: fake.matmuls))
    a, b, ref = operands(rng)
    gb.set_autotune(True)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    gb.set_autotune(False)
    (entry,) = cache_entries().values()
    assert entry["choice"]["config"]["ID"] == chosen and entry["method"] == "heuristic"
    assert entry["timings"] == {"first_ms": 1.0, "chosen_ms": ms[chosen], "noise": 0.0}
    gb.clear_cache()
    no_timing(monkeypatch)
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    assert fake.calls[-1][0] == chosen
    assert lt_plan()[0].choice == -1  # the cached algorithm, not a heuristic index


def test_tuning_waits_for_its_events_isolated_from_other_threads_captures(gpu, monkeypatch, rng) -> None:
    """Waiting for an event while another thread captures in CUDA's global mode (torch's default) fails and
    invalidates that capture: the timer waits with this thread's capture mode thread-local (``Events`` refuses any
    other wait), and gives the thread its mode back."""
    fake, _ = gpu
    events = Events(lambda: {0: 1.0, 1: 0.5}[fake.calls[-1][0]], lambda: fake.matmuls)
    monkeypatch.setattr(timer, "driver", events)
    gb.set_autotune(True)
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    assert events.timed > 0 and events.mode == events.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL


@pytest.mark.parametrize("graphs_on", [True, False], ids=["graphs_on", "graphs_off"])
def test_host_bound_candidates_are_timed_as_graph_replays_unless_graphs_are_off(gpu, monkeypatch, rng, graph_switch,
                                                                                graphs_on) -> None:  # fmt: skip
    """Launched one by one, both candidates cost the host's 0.03 ms per launch; replayed from a graph, their
    kernels' own times (0.01 and 0.005 ms) show, and the faster one is kept. With graphs off (``set_graphs``)
    nothing is captured: the calls will be launched one by one, and are timed so (a tie: the first pick kept)."""
    from gemmbridge.backends.cuda import graphs

    fake, _ = gpu
    state = {"graph": False, "replaying": False}  # graph: the launches since the last event came from a replay
    captured: list = []
    real = fake.matmul

    def matmul(*args):  # type: ignore[no-untyped-def]
        state["graph"] = state["replaying"]
        real(*args)

    def capture(device, enqueue):  # type: ignore[no-untyped-def]
        captured.append(enqueue)
        return (len(captured), enqueue)

    def replay(graph, stream):  # type: ignore[no-untyped-def]
        state["replaying"] = True
        graph[1](stream)
        state["replaying"] = False

    def cost() -> float:
        kernel = {0: 0.01, 1: 0.005}[fake.calls[-1][0]]
        return kernel if state["graph"] else max(kernel, 0.03)

    monkeypatch.setattr(fake, "matmul", matmul)
    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(graphs, "_launch", replay)
    events = Events(cost, lambda: fake.matmuls)
    monkeypatch.setattr(timer, "driver", events)
    graph_switch(graphs_on)
    gb.set_autotune(True)
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    (entry,) = cache_entries().values()
    if graphs_on:
        assert len(captured) == 2 and sorted(events.destroyed) == [1, 2]  # each captured once, destroyed at the end
        assert entry["timings"] == {"first_ms": pytest.approx(0.01), "chosen_ms": pytest.approx(0.005), "noise": 0.0}
        assert fake.calls[-1][0] == 1
    else:
        assert captured == [] and events.destroyed == []
        assert entry["timings"] == {"first_ms": pytest.approx(0.03), "chosen_ms": pytest.approx(0.03), "noise": 0.0}
        assert fake.calls[-1][0] == 0


def store_choice(gpu, monkeypatch, rng) -> None:  # type: ignore[no-untyped-def]
    """Tune once (candidate 1 wins) and forget the plans."""
    fake, _ = gpu
    monkeypatch.setattr(timer, "driver", Events(lambda: {0: 1.0, 1: 0.5}[fake.calls[-1][0]], lambda: fake.matmuls))
    gb.set_autotune(True)
    gb.matmul(*operands(rng)[:2])
    gb.set_autotune(False)
    gb.clear_cache()


def test_the_cache_turned_off_is_not_read(gpu, monkeypatch, rng) -> None:
    store_choice(gpu, monkeypatch, rng)
    monkeypatch.setattr(tuning, "enabled", False)
    gb.matmul(*operands(rng)[:2])
    assert gpu[0].calls[-1][0] == 0


@pytest.mark.parametrize("field", ["name", "driver", "cublasLt"])
def test_another_device_key_does_not_use_the_entry(gpu, monkeypatch, rng, field) -> None:
    store_choice(gpu, monkeypatch, rng)
    monkeypatch.setattr(tuning_cache, "_devices", {0: {**EMULATED_DEVICE, field: "other"}})
    gb.matmul(*operands(rng)[:2])
    assert gpu[0].calls[-1][0] == 0


def edit_entry(change) -> None:  # type: ignore[no-untyped-def]
    path = tuning_cache._file(0).path  # type: ignore[union-attr]
    with open(path) as f:
        doc = json.load(f)
    (entry,) = doc["entries"].values()
    change(entry["choice"])
    with open(path, "w") as f:
        json.dump(doc, f)


def _refused_tile(choice: dict) -> None:  # consistent, but the library no longer accepts it
    words = np.frombuffer(bytes.fromhex(choice["data"]), np.uint64).copy()
    words[1] = 0
    choice["data"], choice["config"]["TILE_ID"] = words.tobytes().hex(), 0


@pytest.mark.parametrize(
    "change",
    [
        _refused_tile,
        lambda c: c["config"].update(TILE_ID=TILES[0]),  # the bytes no longer read as the configuration
        lambda c: c.update(data="zz"),
        lambda c: c.update(data=c["data"][:-2]),
        lambda c: c.pop("config"),
        lambda c: c.update(backend="kernel"),  # no source for it
        lambda c: c["config"].update(ID=float("inf")),  # json writes Infinity, and reads it back
    ],
    ids=["refused", "config-mismatch", "bad-hex", "short", "no-config", "unknown-backend", "infinite-id"],
)
def test_a_stale_or_corrupted_entry_is_ignored(gpu, monkeypatch, rng, change) -> None:
    store_choice(gpu, monkeypatch, rng)
    edit_entry(change)
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    assert gpu[0].calls[-1][0] == 0 and lt_plan()[0].choice == 0


# values a corrupted file may hold where it had another: every JSON type, non-finite and huge numbers, the backends
SPECIAL = st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**400, -(2**64), 1e308, "cublaslt", "kernel"])
JSON_VALUES = SPECIAL | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_DEEP = "\x00deep\x00"  # stands for a value nested too deep to write with json.dumps


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON document: the keys and indices that lead to it."""
    found = [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found += _paths(inner, (*path, key))
    return found


@st.composite
def corrupted(draw: st.DrawFn, text: str) -> bytes:
    """``text`` (a valid tuning file) corrupted one way: truncated, bytes flipped, or a value somewhere in it (half the
    time in the choice a backend reads back) swapped for another type or number, nested deep, its key renamed or
    removed."""
    kind = draw(st.sampled_from(["truncate", "flip", "swap", "swap", "nest", "rename", "drop"]))
    data = text.encode()
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(flipped)
    root = {"": json.loads(text)}
    paths = _paths(root)[1:]
    choices = [p for p in paths if "choice" in p]  # what a backend reads back: half the draws
    path = draw(st.sampled_from(paths) | st.sampled_from(choices))
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    key, deep = path[-1], ""
    if kind == "nest":
        depth = draw(st.sampled_from([2, 100, 5_000, 100_000]))
        deep = "[" * depth + json.dumps(parent[key]) + "]" * depth
        parent[key] = _DEEP
    elif kind == "swap" or path == ("",):  # the document itself is only ever replaced
        parent[key] = draw(JSON_VALUES)
    elif kind == "rename" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = parent.pop(key)
    else:
        del parent[key]
    return json.dumps(root[""]).replace(json.dumps(_DEEP), deep).encode()


def test_fuzz_corrupted_cache_files_are_ignored_never_an_error(gpu, monkeypatch, rng) -> None:
    """Generated corruptions of a tuning file holding a tuned choice: the reader keeps only well-formed entries, and a
    new plan gets a right result from the cached choice or the heuristic's first pick — never an exception."""
    store_choice(gpu, monkeypatch, rng)
    path = tuning_cache._file(0).path  # type: ignore[union-attr]
    with open(path) as f:
        text = f.read()
    a, b, ref = operands(rng)

    @settings(max_examples=int(os.environ.get("GEMMBRIDGE_FUZZ_CACHE", 200)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(corrupted(text))
    def fuzz(content: bytes) -> None:
        with open(path + ".new", "wb") as f:
            f.write(content)
        os.replace(path + ".new", path)  # a new inode: the reader's memo sees the change
        assert all(tuning.valid_entry(e) for e in tuning_cache._file(0).entries().values())  # type: ignore[union-attr]
        gb.clear_cache()
        np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)

    fuzz()


def test_a_cached_algorithm_refused_at_launch_falls_back_to_the_first_pick(gpu, monkeypatch, rng) -> None:
    store_choice(gpu, monkeypatch, rng)
    gpu[0].refuse = {1}
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    assert gpu[0].calls[-1][0] == 0 and lt_plan()[0].choice == 0


def explored_ms(fake) -> float:  # type: ignore[no-untyped-def]
    """A fake cost model: the 128x256 tile and CTA swizzling each save 20 %, algorithm 2 costs double."""
    words = fake.last
    ms = 1.0 - 0.2 * (words[1] == TILE_256) - 0.2 * (words[SWIZZLE] == 1)
    return ms * (2.0 if words[0] == 3 else 1.0)


def test_exploring_finds_a_configuration_two_changes_away_and_keeps_it(gpu, monkeypatch, rng) -> None:
    fake, _ = gpu
    monkeypatch.setattr(timer, "driver", Events(lambda: explored_ms(fake), lambda: fake.matmuls))
    monkeypatch.setattr(autotune, "exploring", True)
    launched: set[tuple[int, ...]] = set()
    real = fake.matmul

    def record(*args):  # type: ignore[no-untyped-def]
        real(*args)
        launched.add(fake.last)

    monkeypatch.setattr(fake, "matmul", record)
    told: list = []
    monkeypatch.setattr(autotune, "on_tuned", lambda described, tuned, forget: told.append(tuned))
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    (tuned,) = told
    assert tuned.method == "explore" and tuned.first_ms == 1.0 and tuned.chosen_ms == pytest.approx(0.6)
    words = {w[0] - 1 for w in launched}
    assert words == {0, 1, 2}, "the heuristic's ids and the unseen id 2 were timed"
    assert all(w[1] != 0 and w[3] != 8 for w in launched), "refused or over-workspace configurations never ran"
    assert any(w[3] > 1 for w in launched) and any(w[2] == STAGES[1] for w in launched)
    assert fake.last[1] == TILE_256 and fake.last[SWIZZLE] == 1  # the real call ran the choice
    (entry,) = cache_entries().values()
    assert entry["method"] == "explore" and entry["choice"]["config"]["TILE_ID"] == TILE_256
    assert entry["choice"]["config"]["CTA_SWIZZLING"] == 1 and entry["candidates"] == len(tuned.timings)
    monkeypatch.setattr(autotune, "exploring", False)
    gb.clear_cache()
    no_timing(monkeypatch)
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    assert fake.last[1] == TILE_256 and fake.last[SWIZZLE] == 1


def test_exploring_keeps_the_first_pick_when_nothing_beats_it_by_the_margin(gpu, monkeypatch, rng) -> None:
    fake, _ = gpu
    monkeypatch.setattr(timer, "driver", Events(lambda: 1.0 - 0.01 * (fake.last[1] == TILE_256), lambda: fake.matmuls))
    monkeypatch.setattr(autotune, "exploring", True)
    gb.matmul(*operands(rng)[:2])
    (entry,) = cache_entries().values()
    assert entry["choice"]["config"]["ID"] == 0 and entry["choice"]["config"]["TILE_ID"] == TILES[1]
    assert lt_plan()[0].choice == 0


def test_exploring_stops_at_the_budget(gpu, monkeypatch, rng) -> None:
    fake, _ = gpu
    events = Events(lambda: explored_ms(fake), lambda: fake.matmuls)
    monkeypatch.setattr(timer, "driver", events)
    monkeypatch.setattr(autotune, "exploring", True)
    monkeypatch.setattr(explore, "budget_s", 0.0)
    gb.matmul(*operands(rng)[:2])
    # only the first pick was timed briefly, then it alone in the final rounds (2 measurements per timing)
    assert events.timed == 2 * (2 + 1 + autotune.ROUNDS)  # two warm-up chunks that agree, the screening, the rounds


class KernelSource:
    """Another backend's candidates: a 'kernel' computing the product on the emulated device (host) memory."""

    backend = "kernel"

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a, self.b, self.launches, self.restored = a, b, 0, []

    def _candidate(self, block: int) -> autotune.Candidate:
        def launch(ptrs, alpha, beta, workspace, stream):  # type: ignore[no-untyped-def]
            self.launches += 1
            m, n = self.a.shape[0], self.b.shape[1]
            product = alpha * (np.asarray(self.a) @ np.asarray(self.b))
            device(ptrs.d, np.float64, m * n, "the kernel's D")[:] = product.ravel()

        return autotune.Candidate(f"kernel block {block}", {"backend": "kernel", "config": {"block": block}}, launch)

    def candidates(self, problem, alignments, tf32):  # type: ignore[no-untyped-def]
        assert (problem.m, problem.n, problem.k) == (6, 5, 4) and len(alignments) == 4 and tf32 is False
        return [self._candidate(64), self._candidate(128)]

    def restore(self, problem, alignments, tf32, payload):  # type: ignore[no-untyped-def]
        self.restored.append(payload)
        return self._candidate(payload["config"]["block"])


def test_an_extra_source_competes_is_kept_and_is_restored_from_the_cache(gpu, monkeypatch, rng) -> None:
    fake, _ = gpu
    monkeypatch.setattr(autotune, "sources", {})  # this stand-in replaces the real skinny kernel for this test only
    a, b, ref = operands(rng)
    source = KernelSource(a, b)
    state = {"last": "lt"}
    real = fake.matmul

    def lt_matmul(*args):  # type: ignore[no-untyped-def]
        state["last"] = "lt"
        real(*args)

    monkeypatch.setattr(fake, "matmul", lt_matmul)
    kernel_launch = source._candidate

    def tracked(block: int) -> autotune.Candidate:
        cand = kernel_launch(block)

        def launch(*args):  # type: ignore[no-untyped-def]
            state["last"] = f"kernel {block}"
            cand.launch(*args)

        return autotune.Candidate(cand.name, cand.payload, launch)

    monkeypatch.setattr(source, "_candidate", tracked)
    cost = {"lt": 1.0, "kernel 64": 0.7, "kernel 128": 0.4}
    monkeypatch.setattr(timer, "driver", Events(lambda: cost[state["last"]], lambda: fake.matmuls + source.launches))
    monkeypatch.setattr(autotune, "exploring", True)
    autotune.add_source(source)
    try:
        out = gb.matmul(a, b)
        np.testing.assert_allclose(out, ref, rtol=1e-12)
        assert state["last"] == "kernel 128"
        (entry,) = cache_entries().values()
        assert entry["choice"] == {"backend": "kernel", "config": {"block": 128}}
        monkeypatch.setattr(autotune, "exploring", False)
        gb.clear_cache()
        no_timing(monkeypatch)
        before = fake.matmuls
        np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
        assert source.restored == [{"backend": "kernel", "config": {"block": 128}}] and fake.matmuls == before
    finally:
        autotune.remove_source("kernel")
    gb.clear_cache()
    gb.matmul(a, b)
    assert fake.matmuls == before + 1  # without its source the entry is ignored: cuBLASLt's first pick


def test_add_source_refuses_the_builtin_name() -> None:
    class Bad:
        backend = "cublaslt"

    with pytest.raises(ValueError, match="built-in"):
        autotune.add_source(Bad())  # type: ignore[arg-type]


def test_forget_drops_the_entry(gpu, monkeypatch, rng) -> None:
    store_choice(gpu, monkeypatch, rng)
    gb.matmul(*operands(rng)[:2])
    tuning_cache.forget(lt_plan()[0], 0)
    assert cache_entries() == {}


def test_a_driver_that_cannot_name_the_device_means_no_cache_and_no_failure(gpu, monkeypatch, rng, tmp_path) -> None:
    def broken(device):  # type: ignore[no-untyped-def]
        raise RuntimeError("no libcuda")

    monkeypatch.setattr(tuning_cache, "_devices", {})
    monkeypatch.setattr(tuning_cache, "_query", broken)
    monkeypatch.setattr(timer, "driver", Events(lambda: {0: 1.0, 1: 0.5}[gpu[0].calls[-1][0]], lambda: gpu[0].matmuls))
    gb.set_autotune(True)
    a, b, ref = operands(rng)
    np.testing.assert_allclose(gb.matmul(a, b), ref, rtol=1e-12)
    assert tuning_cache._devices == {0: None} and list(tmp_path.glob("*.json")) == []


def test_in_process_autotune_times_the_kernel_too_and_the_cache_keeps_its_win(gpu, monkeypatch):
    """``set_autotune(True)`` offers the registered sources' candidates (the skinny kernel) beside cuBLASLt's: the
    faster kernel is chosen, stored, and restored by a later plan — not shadowed by an untimed cuBLASLt choice."""
    fake, _ = gpu
    ran: list[str] = []
    kernel_launch, kernel_launch_ex, lt_matmul = fake.kernels.launch, fake.kernels.launch_ex, fake.matmul

    def kernel(*args):  # type: ignore[no-untyped-def]
        ran.append("kernel")
        return (kernel_launch if len(args) > 4 else kernel_launch_ex)(*args)  # without PDL, or with it

    def lt(*args):  # type: ignore[no-untyped-def]
        ran.append("cublaslt")
        return lt_matmul(*args)

    from gemmbridge.backends.cuda import kernels

    monkeypatch.setattr(kernels, "mode", "auto")  # its rule gives this 16-wide product to cuBLASLt
    monkeypatch.setattr(kernels.launch, "_launch_v2", kernel)
    if kernels.launch._v2 is not None:
        monkeypatch.setattr(kernels.launch, "_launch_ex", kernel)
    monkeypatch.setattr(fake, "matmul", lt)
    monkeypatch.setattr(timer, "driver", Events(lambda: 0.5 if ran[-1] == "kernel" else 1.0, lambda: len(ran)))
    rng = np.random.default_rng(0)
    a = on_device(rng.standard_normal((512, 256)), np.float16)
    b = on_device(rng.standard_normal((256, 16)), np.float16)
    gb.set_autotune(True)
    try:
        gb.matmul(a, b)
    finally:
        gb.set_autotune(False)
    assert "kernel" in ran and "cublaslt" in ran  # both timed
    gb.clear_cache()
    ran.clear()
    result = gb.matmul(a, b)  # a new plan: the cache's choice
    assert ran == ["kernel"]
    np.testing.assert_allclose(np.asarray(result, np.float64), np.asarray(a, np.float64) @ np.asarray(b, np.float64),
                               rtol=2e-2, atol=2e-2)  # fmt: skip
