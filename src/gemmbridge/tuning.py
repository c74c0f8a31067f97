"""The persistent tuning cache: tuned choices on disk, one JSON file per device, shared by processes.

Location: ``$GEMMBRIDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/gemmbridge``, else ``~/.cache/gemmbridge``;
``GEMMBRIDGE_TUNING_CACHE=0`` turns it off (nothing read, nothing written). A device key (for CUDA: GPU
name, SM count, driver, cuBLASLt version) and ``FORMAT`` name the file; inside, entries are keyed by the
problem (``problem_key``) and hold a JSON "choice" (``{"backend": "cublaslt", ...}``, or another backend's
payload) with the timings that chose it.

Writers take an exclusive ``flock`` on ``<file>.lock``, re-read the file, merge their entries into it
and replace it atomically (temporary file + ``os.replace``), so concurrent processes never lose each
other's entries and readers never see half a file. A file or entry that is unreadable, corrupted, of
another format or of another device is ignored (never an error); a corrupted file is replaced by a
valid one on the next write. Writing problems (a read-only directory, a full disk) warn once and are
otherwise ignored: tuning is an optimisation, never a reason for a call to fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import warnings
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: writes stay atomic, concurrent writers may drop each other's entries
    fcntl = None  # type: ignore[assignment]

FORMAT = 1
enabled = os.environ.get("GEMMBRIDGE_TUNING_CACHE", "1") != "0"

_warned: set[str] = set()
_files: dict[str, TuningFile] = {}
_files_lock = threading.Lock()


def cache_dir() -> str:
    """Where the tuning files live (the environment is read on every call)."""
    env = os.environ.get
    if env("GEMMBRIDGE_CACHE_DIR"):
        return str(env("GEMMBRIDGE_CACHE_DIR"))
    base = env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gemmbridge")


def canonical(value: Any) -> str:
    """``value`` as compact JSON with sorted keys: equal values, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def problem_key(fields: dict[str, Any]) -> str:
    """An entry's key: the problem's fields (dtypes, shapes, layouts, alignments, epilogue, TF32) as text."""
    return canonical(fields)


def valid_entry(entry: Any) -> bool:
    """An entry is ``{"choice": {"backend": str, ...}, "timings": {name: ms}, ...}``."""
    if not isinstance(entry, dict):
        return False
    choice, timings = entry.get("choice"), entry.get("timings", {})
    return (
        isinstance(choice, dict)
        and isinstance(choice.get("backend"), str)
        and isinstance(timings, dict)
        and all(isinstance(v, (int, float)) for v in timings.values())
    )


def file_for(device: dict[str, Any]) -> TuningFile:
    """The tuning file of ``device`` (a JSON-able description) in the current ``cache_dir``."""
    text = canonical({"device": device, "format": FORMAT})
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(device.get("name", "device"))).strip("-")[:40] or "device"
    path = os.path.join(cache_dir(), f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json")
    with _files_lock:
        found = _files.get(path)
        if found is None or found.device != device:
            found = _files[path] = TuningFile(path, device)
    return found


class TuningFile:
    """One device's entries on disk; reads are memoised until the file changes (stat per lookup)."""

    def __init__(self, path: str, device: dict[str, Any]) -> None:
        self.path = path
        self.device = device
        self._seen: tuple[int, int, int] | None = None
        self._entries: dict[str, dict] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict]:
        """The file's valid entries; {} when it is missing, unreadable, corrupted or not this device's."""
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError, RecursionError):  # unreadable, not JSON (or not UTF-8), nested too deep
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("device") != self.device:
            return {}
        entries = doc.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(k, str) and valid_entry(v)}

    def entries(self) -> dict[str, dict]:
        """Every valid entry (re-read only when the file's inode, size or mtime changed)."""
        try:
            st = os.stat(self.path)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        with self._lock:
            if seen != self._seen:
                self._entries = self._read() if seen is not None else {}
                self._seen = seen
            return self._entries

    def get(self, key: str) -> dict | None:
        return self.entries().get(key)

    def put(self, entries: dict[str, dict], remove: tuple[str, ...] = ()) -> bool:
        """Merge ``entries`` into the file (and drop the keys in ``remove``) under the lock, replacing it atomically;
        False if it could not be written (warned once per path)."""
        bad = [k for k, v in entries.items() if not valid_entry(v)]
        if bad:
            raise ValueError(f"tuning cache: entries {bad} are not {{'choice': {{'backend': ...}}, 'timings': ...}}")
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            with open(self.path + ".lock", "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                merged = {k: v for k, v in {**self._read(), **entries}.items() if k not in remove}
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tuning-", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"format": FORMAT, "device": self.device, "entries": merged}, f, indent=1,
                                  sort_keys=True)  # fmt: skip
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
        except OSError as error:
            if self.path not in _warned:
                _warned.add(self.path)
                warnings.warn(f"gemmbridge: the tuning cache {self.path} cannot be written ({error})", stacklevel=2)
            return False
        return True
