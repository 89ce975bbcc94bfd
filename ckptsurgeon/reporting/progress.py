"""A bytes progress bar (rate, ETA) on stderr; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ByteProgress:
    """Implements the writer's ``Progress`` protocol with a rich bar.

    Enabled only when ``quiet`` is false and stderr is a TTY, so logs and pipelines stay
    clean without anyone passing a flag.
    """

    def __init__(self, label: str, *, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self._bar: Progress | None = None
        self._task = None
        self._label = label

    def start(self, total: int) -> None:
        if not self.enabled:
            return
        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )  # fmt: skip
        self._bar.start()
        self._task = self._bar.add_task(self._label, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
