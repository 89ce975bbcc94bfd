"""Checkpoint formats: read every supported layout as a lazy table, write it back atomically."""

from ckptsurgeon.formats.reader import Checkpoint, detect_format, open_checkpoint
from ckptsurgeon.formats.table import Table, TensorRef
from ckptsurgeon.formats.writer import WriteResult, write_checkpoint

__all__ = [
    "Checkpoint",
    "Table",
    "TensorRef",
    "WriteResult",
    "detect_format",
    "open_checkpoint",
    "write_checkpoint",
]
