"""torch.distributed.checkpoint (DCP) folders: read through an unpickler that admits DCP's
metadata classes only, written as DCP's own ``FileSystemWriter`` lays them out."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar

from ckptsurgeon.formats.checkpoint import DCP_METADATA_FILE
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


class DcpFormat(Format):
    name = "dcp"
    description = "torch.distributed.checkpoint folders (FSDP, torchtitan)"
    formats = ("dcp",)
    outputs: ClassVar[tuple[Output, ...]] = (Output("dcp", (), "folder"),)

    def sniff(self, probe: Probe) -> Sniff | None:
        return Sniff("dcp", 1.0) if probe.has(DCP_METADATA_FILE) else None

    def open(self, request: ReadRequest) -> Checkpoint:
        from ckptsurgeon.formats.checkpoint import Checkpoint
        from ckptsurgeon.formats.dcp_io import open_dcp

        folder = request.file
        files = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
        ckpt = Checkpoint(request.path, "dcp", open_dcp(folder), files=files)
        _find_containers(ckpt, request.key)
        return ckpt

    def write(self, tmp: str, items: Items, request: WriteRequest) -> list[str]:
        from ckptsurgeon.formats import dcp_writer

        return dcp_writer.write_dcp(
            tmp,
            list(items),
            request.metadata,
            request.on_bytes,
            sync=request.durable,
            file_size=request.max_shard_size or dcp_writer.DEFAULT_FILE_SIZE,
        )


def _find_containers(ckpt: Checkpoint, key: str | None) -> None:
    """A training loop's DCP state is one dict of containers flattened by name (``model.*``,
    ``optim.*``): list them, and without ``key`` take the model's weights by default."""
    from ckptsurgeon.formats.checkpoint import CONTAINER_PREFERENCE, choose_prefix_container

    heads = {name.split(".", 1)[0] for name in ckpt.tensors}
    if not heads or not heads <= {*CONTAINER_PREFERENCE, "optim", "optimizer"}:
        return
    ckpt.containers = sorted(heads)
    candidates = [h for h in CONTAINER_PREFERENCE if h in heads]
    if key is None and candidates:
        ckpt.note = (
            f"container {candidates[0]!r} chosen (DCP entries are named '{candidates[0]}.*')"
        )
        choose_prefix_container(ckpt, candidates[0])
