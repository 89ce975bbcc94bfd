"""Waiting for the disk: the one place a written file is flushed and fsync'd."""

from __future__ import annotations

import os
from typing import IO


def fsync_file(f: IO[bytes] | IO[str]) -> None:
    """Flush ``f`` and wait until its bytes are on the disk."""
    f.flush()
    os.fsync(f.fileno())
