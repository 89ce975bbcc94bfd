"""DeepSpeed ZeRO stage 1-3 checkpoint folders, consolidated as ``zero_to_fp32`` does,
without importing deepspeed (its records unpickled by name)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsurgeon.formats import zero_folder
from ckptsurgeon.formats.family import Format, Probe, ReadRequest, Sniff

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint


class ZeroFormat(Format):
    name = "deepspeed-zero"
    description = "DeepSpeed ZeRO 1/2/3 folders (read: consolidated fp32 weights)"
    formats = zero_folder.ZERO_FORMATS

    def sniff(self, probe: Probe) -> Sniff | None:
        if not (probe.is_dir and zero_folder.is_zero_folder(probe.path)):
            return None
        return Sniff(zero_folder.zero_format(zero_folder.locate(probe.path)), 1.0)

    def open(self, request: ReadRequest) -> Checkpoint:
        from ckptsurgeon.formats.zero_io import open_zero

        return open_zero(request.file)
