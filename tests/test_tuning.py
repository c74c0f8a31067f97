"""The tuning cache's storage (``gemmbridge.tuning``): location, keying, round trip, atomic writes, corrupted and
foreign files and entries ignored, concurrent writers from several processes."""

from __future__ import annotations

import json
import os

import pytest

from gemmbridge import tuning

DEVICE = {"name": "NVIDIA H100 80GB HBM3", "sms": 132, "capability": "9.0", "driver": "580.159.04",
          "cuda_driver": 13000, "cublasLt": 130100}  # fmt: skip


def entry(algo: int, ms: float = 1.0) -> dict:
    return {"choice": {"backend": "cublaslt", "config": {"ID": algo}}, "timings": {"first_ms": 2.0, "chosen_ms": ms}}


@pytest.fixture
def cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_files", {})
    return tmp_path / "cache"


def test_location_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(tmp_path / "mine"))
    assert tuning.cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("GEMMBRIDGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == str(tmp_path / "xdg" / "gemmbridge")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_dir() == str(tmp_path / "home" / ".cache" / "gemmbridge")


def test_round_trip_in_a_fresh_reader(cache) -> None:
    key = tuning.problem_key({"m": 4096, "n": 4096, "k": 4096, "dtype": "bfloat16"})
    assert tuning.file_for(DEVICE).put({key: entry(66)})
    tuning._files.clear()  # a new process: nothing memoised
    assert tuning.file_for(DEVICE).get(key) == entry(66)
    (path,) = cache.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == tuning.FORMAT and doc["device"] == DEVICE and list(doc["entries"]) == [key]
    assert path.name.startswith("NVIDIA-H100-80GB-HBM3-")


def test_problem_keys_are_canonical() -> None:
    assert tuning.problem_key({"m": 1, "n": 2}) == tuning.problem_key({"n": 2, "m": 1})
    assert tuning.problem_key({"m": 1, "n": 2}) != tuning.problem_key({"m": 2, "n": 1})


@pytest.mark.parametrize("field", ["name", "sms", "driver", "cublasLt"])
def test_another_gpu_driver_or_library_version_does_not_see_the_entries(cache, field) -> None:
    tuning.file_for(DEVICE).put({"p": entry(1)})
    other = {**DEVICE, field: DEVICE[field] + 1 if isinstance(DEVICE[field], int) else DEVICE[field] + "x"}
    assert tuning.file_for(other).path != tuning.file_for(DEVICE).path
    assert tuning.file_for(other).get("p") is None
    assert tuning.file_for(DEVICE).get("p") == entry(1)


def test_a_file_copied_from_another_device_or_format_is_ignored(cache) -> None:
    mine, other = tuning.file_for(DEVICE), tuning.file_for({**DEVICE, "sms": 114})
    other.put({"p": entry(1)})
    os.makedirs(cache, exist_ok=True)
    with open(other.path) as f:
        doc = json.load(f)
    with open(mine.path, "w") as f:
        json.dump(doc, f)  # the other device's entries under this device's name
    assert mine.get("p") is None
    doc["device"], doc["format"] = DEVICE, tuning.FORMAT + 1
    with open(mine.path, "w") as f:
        json.dump(doc, f)  # a future format
    assert mine.get("p") is None


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"\xff\xfe garbage", b"[]", b'{"format": 1}', b"null", b'{"entries": 5}', b"[" * 100_000],
    ids=["empty", "open", "bytes", "list", "no-device", "null", "entries-int", "deep"],
)
def test_a_corrupted_file_is_ignored_then_replaced_by_a_valid_one(cache, content) -> None:
    file = tuning.file_for(DEVICE)
    os.makedirs(cache, exist_ok=True)
    with open(file.path, "wb") as f:
        f.write(content)
    assert file.entries() == {}
    assert file.put({"p": entry(3)})
    tuning._files.clear()
    assert tuning.file_for(DEVICE).entries() == {"p": entry(3)}


def test_corrupted_entries_are_ignored_and_the_valid_ones_kept(cache) -> None:
    file = tuning.file_for(DEVICE)
    file.put({"good": entry(1)})
    with open(file.path) as f:
        doc = json.load(f)
    doc["entries"].update({
        "no choice": {"timings": {}},
        "no backend": {"choice": {"config": 1}},
        "bad timings": {"choice": {"backend": "cublaslt"}, "timings": {"first_ms": "fast"}},
        "not a dict": [1, 2],
    })  # fmt: skip
    with open(file.path, "w") as f:
        json.dump(doc, f)
    assert file.entries() == {"good": entry(1)}
    file.put({"new": entry(2)})
    assert set(file.entries()) == {"good", "new"}


def test_a_write_that_fails_midway_leaves_the_file_and_no_temporary(cache, monkeypatch) -> None:
    file = tuning.file_for(DEVICE)
    file.put({"p": entry(1)})
    before = open(file.path).read()

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuning.json, "dump", broken)
    with pytest.warns(UserWarning, match="cannot be written"):
        assert not file.put({"q": entry(2)})
    assert open(file.path).read() == before
    name = os.path.basename(file.path)
    assert sorted(p.name for p in cache.iterdir()) == [name, name + ".lock"]


def test_an_unwritable_location_warns_once_and_never_raises(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GEMMBRIDGE_CACHE_DIR", str(blocker / "cache"))  # a directory under a file
    monkeypatch.setattr(tuning, "_files", {})
    monkeypatch.setattr(tuning, "_warned", set())
    file = tuning.file_for(DEVICE)
    with pytest.warns(UserWarning, match="cannot be written"):
        assert not file.put({"p": entry(1)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not file.put({"p": entry(1)})  # said once
    assert file.get("p") is None


def test_readers_see_another_writers_update(cache) -> None:
    reader, writer = tuning.TuningFile(tuning.file_for(DEVICE).path, DEVICE), tuning.file_for(DEVICE)
    writer.put({"p": entry(1)})
    assert reader.get("p") == entry(1)
    writer.put({"p": entry(2, 0.5)})
    assert reader.get("p") == entry(2, 0.5)
    writer.put({}, remove=("p",))
    assert reader.get("p") is None


def test_an_invalid_entry_is_refused_before_writing(cache) -> None:
    with pytest.raises(ValueError, match="not"):
        tuning.file_for(DEVICE).put({"p": {"timings": {}}})


WRITER = """
import os, sys, time
from gemmbridge import tuning
device, folder, worker, count = eval(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
while not os.path.exists(os.path.join(folder, "go")):  # every writer starts at once
    time.sleep(0.001)
file = tuning.file_for(device)
for i in range(count):
    entry = {"choice": {"backend": "cublaslt", "config": {"ID": worker * 1000 + i}},
             "timings": {"first_ms": 2.0, "chosen_ms": 1.0}}
    file.put({f"w{worker}-{i}": entry})
"""


@pytest.mark.skipif(tuning.fcntl is None, reason="no flock on this platform")
def test_concurrent_writers_in_several_processes_all_land(cache, tmp_path) -> None:
    import subprocess
    import sys

    import gemmbridge

    workers, count = 4, 40
    source = os.path.dirname(os.path.dirname(os.path.abspath(gemmbridge.__file__)))
    env = {**os.environ, "GEMMBRIDGE_CACHE_DIR": str(cache), "PYTHONPATH": source}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, repr(DEVICE), str(tmp_path), str(w), str(count)],
                              env=env) for w in range(workers)]  # fmt: skip
    (tmp_path / "go").write_text("")
    assert [p.wait(timeout=120) for p in procs] == [0] * workers
    tuning._files.clear()
    entries = tuning.file_for(DEVICE).entries()
    assert len(entries) == workers * count
    assert entries["w3-39"] == entry(3039)
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []
