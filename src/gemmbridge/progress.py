"""A progress bar for the command-line tools: rich on stderr, or one plain line per step without rich."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """``with Progress(total, enabled) as p: p.step("what now"); ...; p.advance()``."""

    def __init__(self, total: int, enabled: bool, name: str = "bench") -> None:
        self.total, self.enabled, self.name, self.done = total, enabled, name, 0
        self.bar: Any = None

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar
        except ImportError:
            return self
        columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar = Bar(*columns, console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.name, total=self.total)
        return self

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
