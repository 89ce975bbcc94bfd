"""The library's one logger. ckptsurgeon's steps report progress through a ``Log`` (a
function of one line); by default that is :func:`info`, the ``ckptsurgeon`` logger, and the
CLI passes its own printer instead (stdout, or stderr beside ``--json``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

Log = Callable[[str], None]

logger = logging.getLogger("ckptsurgeon")


def info(message: str) -> None:
    """The default ``Log``: one INFO record on the ``ckptsurgeon`` logger."""
    logger.info(message)


def quiet(message: str) -> None:
    """A ``Log`` that says nothing (every rank but 0 under torchrun)."""
