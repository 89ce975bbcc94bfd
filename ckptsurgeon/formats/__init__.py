"""Checkpoint formats: read every supported layout as a lazy table, write it back atomically.

The names below are imported on first use, so that the torch-free parts of this package
(:mod:`~ckptsurgeon.formats.safetensors_header`, :mod:`~ckptsurgeon.formats.prehash`,
:mod:`~ckptsurgeon.formats.checkpoint`, :mod:`~ckptsurgeon.formats.header_table`) load
without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint, detect_format
    from ckptsurgeon.formats.reader import open_checkpoint
    from ckptsurgeon.formats.table import Table, TensorRef
    from ckptsurgeon.formats.writer import WriteResult, write_checkpoint

_HOMES = {
    "Checkpoint": "checkpoint",
    "detect_format": "checkpoint",
    "open_checkpoint": "reader",
    "Table": "table",
    "TensorRef": "table",
    "WriteResult": "writer",
    "write_checkpoint": "writer",
}

__all__ = [
    "Checkpoint",
    "Table",
    "TensorRef",
    "WriteResult",
    "detect_format",
    "open_checkpoint",
    "write_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
