"""The two ways a gemmbridge.torch training call runs, for tests that check both: "eager" (the launch lane) and
"traced" (the GEMMs ``torch.compile`` traces — aten's ops, and the ``gemmbridge::gemm`` op on CUDA — run eagerly)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

PATHS = ("eager", "traced")


@contextlib.contextmanager
def traced_path() -> Iterator[None]:
    from gemmbridge.torch import functions, lane

    with pytest.MonkeyPatch.context() as m:
        m.setattr(lane, "_is_compiling", lambda: True)
        m.setattr(functions, "_is_compiling", lambda: True)
        yield


def on_path(path: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on ``path`` (one of ``PATHS``)."""
    if path == "eager":
        return fn

    def run(*args: Any) -> Any:
        with traced_path():
            return fn(*args)

    return run
