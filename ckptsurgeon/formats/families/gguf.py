"""GGUF files (llama.cpp's format), read through the ``gguf`` package and dequantized."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptsurgeon.formats.checkpoint import GGUF_MAGIC
from ckptsurgeon.formats.family import Format, Probe, ReadRequest, Sniff

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint


class GgufFormat(Format):
    name = "gguf"
    description = "GGUF files (llama.cpp), every quantization gguf-py decodes"
    formats = ("gguf",)

    def sniff(self, probe: Probe) -> Sniff | None:
        if probe.head[:4] == GGUF_MAGIC:
            return Sniff("gguf", 1.0)
        if probe.path.endswith(".gguf"):  # without the magic: the reader says what is wrong
            return Sniff("gguf", 0.45)
        return None

    def open(self, request: ReadRequest) -> Checkpoint:
        from ckptsurgeon.formats.gguf_io import open_gguf

        return open_gguf(request.file)

    def describe(self, ckpt: Checkpoint) -> dict[str, Any]:
        # The table's dtypes are the dequantized ones; say what the file stores.
        return {
            "architecture": ckpt.metadata.get("general.architecture"),
            "quantization": ckpt.quantization,
        }
