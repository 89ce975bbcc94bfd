"""safetensors: one file, or a Hugging Face folder (one ``model.safetensors``, or shards and
their ``*.safetensors.index.json``); read from headers (without torch for ``inspect``),
verified against the digests ckptsurgeon records, written streamed and sharded."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.family import (
    Format,
    Items,
    Output,
    Probe,
    ReadRequest,
    Sniff,
    WriteRequest,
)

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint
    from ckptsurgeon.formats.safetensors_io import Verdict

SHARDED_SUFFIX = ".safetensors.index.json"
# Written once per output in the file's header: "pt" is the safetensors convention for
# tensors saved from torch (transformers checks it).
_FORMAT_METADATA = {"format": "pt"}


class SafetensorsFormat(Format):
    name = "safetensors"
    description = "safetensors files and Hugging Face folders of them, sharded or not"
    formats = ("safetensors", "safetensors-sharded")
    folder_files = ("model.safetensors",)
    folder_suffixes = (".safetensors",)
    outputs: ClassVar[tuple[Output, ...]] = (
        Output("safetensors", (".safetensors",), "safetensors file"),
        Output("folder", (), "folder"),
    )

    def sniff(self, probe: Probe) -> Sniff | None:
        if probe.is_dir:
            return None
        if probe.path.endswith(SHARDED_SUFFIX):
            return Sniff("safetensors-sharded", 1.0)
        head = probe.head
        # An 8-byte little-endian header length that fits the file, then the JSON's "{".
        if (
            len(head) >= 9
            and head[8:9] == b"{"
            and struct.unpack("<Q", head[:8])[0] <= probe.size - 8
        ):
            return Sniff("safetensors", 1.0)
        if probe.path.endswith(".safetensors"):  # a damaged header: the reader says what is wrong
            return Sniff("safetensors", 0.5)
        return None

    def open(self, request: ReadRequest) -> Checkpoint:
        from ckptsurgeon.formats.header_table import read_safetensors
        from ckptsurgeon.formats.safetensors_io import open_safetensors

        return read_safetensors(request.path, request.format, request.file, open_safetensors)

    def open_header(self, request: ReadRequest) -> Checkpoint | None:
        from ckptsurgeon.formats.header_table import NeedsTorch, header_tensors, read_safetensors

        try:
            return read_safetensors(request.path, request.format, request.file, header_tensors)
        except NeedsTorch:
            return None

    def verify(self, ckpt: Checkpoint) -> list[Verdict]:
        from ckptsurgeon.formats import safetensors_io

        if ckpt.format == "safetensors":
            return [safetensors_io.verify_safetensors(f) for f in ckpt.files]
        return _verify_sharded(ckpt.files[0])

    def check_names(self, names: Sequence[str]) -> None:
        from ckptsurgeon.formats.safetensors_header import METADATA_KEY

        if METADATA_KEY in names:
            raise FitError(
                f"a tensor is named {METADATA_KEY!r}, which safetensors keeps for the file's "
                "metadata; rename it with a rule, or write a .pt output"
            )

    def write(self, tmp: str, items: Items, request: WriteRequest) -> list[str]:
        from ckptsurgeon.formats import safetensors_writer

        metadata = {**_FORMAT_METADATA, **request.metadata}
        if not request.output.folder:
            safetensors_writer.write_safetensors(
                tmp, items, metadata, request.on_bytes, sync=request.durable
            )
            return []
        return _write_folder(tmp, items, metadata, request)


def _verify_sharded(index_path: str) -> list[Verdict]:
    from ckptsurgeon.formats import safetensors_io
    from ckptsurgeon.formats.index import read_index

    index = read_index(index_path)
    recorded = index.metadata.get(safetensors_io.DIGEST_KEY)
    if not isinstance(recorded, dict):
        recorded = {}
    folder = os.path.dirname(index_path)
    verdicts = []
    for shard in sorted(index.shards):
        expected = recorded.get(os.path.relpath(shard, folder))
        verdicts.append(
            safetensors_io.verify_safetensors(
                shard, expected if isinstance(expected, str) else None
            )
        )
    return verdicts


def _write_folder(
    tmp: str, items: Items, metadata: dict[str, str], request: WriteRequest
) -> list[str]:
    """A Hugging Face folder: ``model.safetensors``, or shards of at most
    ``max_shard_size`` bytes and their index (which records each shard's digest)."""
    from ckptsurgeon.formats import safetensors_io, safetensors_writer
    from ckptsurgeon.formats.fsync import fsync_file
    from ckptsurgeon.formats.hf_folder import SHARD_INDEX
    from ckptsurgeon.formats.writer import plan_shards

    limit = request.max_shard_size
    shards = plan_shards(list(items), limit) if limit else [list(items)]
    if len(shards) == 1:
        safetensors_writer.write_safetensors(
            os.path.join(tmp, "model.safetensors"), items, metadata, request.on_bytes,
            sync=request.durable,
        )  # fmt: skip
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    digests = safetensors_writer.write_safetensors_files(
        [(os.path.join(tmp, name), shard) for name, shard in zip(names, shards, strict=True)],
        metadata,
        request.on_bytes,
        sync=request.durable,
    )
    weight_map = {n: name for name, shard in zip(names, shards, strict=True) for n, _ in shard}
    index = {
        "metadata": {
            "total_size": sum(ref.nbytes for _, ref in items),
            **metadata,
            # each shard's content digest (inspect --verify)
            safetensors_io.DIGEST_KEY: dict(zip(names, digests, strict=True)),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(tmp, SHARD_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        if request.durable:
            fsync_file(f)
    return [*names, SHARD_INDEX]
