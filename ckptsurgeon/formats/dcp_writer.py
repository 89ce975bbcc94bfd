"""Writing a torch.distributed.checkpoint (DCP) folder, one tensor at a time.

The folder is what ``dcp.save`` writes in one process (``no_dist``): data files
``__0_<n>.distcp`` (each tensor ``torch.save``d at an offset), fsynced, and then ``.metadata``,
DCP's commit point, written last. ``dcp.load`` reads it into a plain state dict, or, resharded,
into an FSDP2 / DTensor model on any number of ranks.

It is DCP's own writer that writes, driven so that it never holds the whole table: the state
dict handed to ``dcp.save`` holds meta tensors (shape and dtype, no data), and the planner
materialises each tensor from its lazy ref only when the writer asks for it. The writer keeps
every tensor of a data file alive until that file is closed, so tensors are grouped into files
of at most ``file_size`` bytes (a larger tensor sits alone): that, or the largest tensor, is
the memory the write needs.
"""

from __future__ import annotations

import json
import os
import queue
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem

from ckptsurgeon.errors import CkptSurgeonError
from ckptsurgeon.formats.checkpoint import DCP_METADATA_FILE
from ckptsurgeon.formats.fsync import fsync_file
from ckptsurgeon.formats.hf_folder import DCP_PROVENANCE
from ckptsurgeon.formats.table import TensorRef, dtype_itemsize

DEFAULT_FILE_SIZE = 256 << 20  # bytes per data file, so at most this much held while writing

Items = Sequence[tuple[str, TensorRef]]


def write_dcp(
    folder: str,
    items: Items,
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
    *,
    sync: bool = True,
    file_size: int = DEFAULT_FILE_SIZE,
) -> list[str]:
    """Write ``items`` as a DCP checkpoint into the existing, empty ``folder``; returns the
    names of the files written, ``.metadata`` last.

    ``metadata`` (the producer and the inputs' record) goes to ``ckptsurgeon.json`` beside
    the data, written first, so ``.metadata`` still completes the folder. ``on_bytes(n)`` is
    called as each tensor is read for writing. With ``sync`` every file is fsynced, as
    ``dcp.save``'s ``sync_files`` does.
    """
    with open(os.path.join(folder, DCP_PROVENANCE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
        f.write("\n")
        if sync:
            fsync_file(f)
    refs = dict(items)
    # Meta tensors: the planner learns every shape and dtype without reading any data.
    state = {name: torch.empty(ref.shape, dtype=ref.dtype, device="meta") for name, ref in items}
    order = {name: i for i, (name, _) in enumerate(items)}
    writer = _GroupedWriter(folder, file_size, order, sync_files=sync, thread_count=1)
    try:
        with warnings.catch_warnings():
            # "assuming the intent is to save in a single process": it is, even under torchrun
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(
                state, storage_writer=writer, planner=_LazyPlanner(refs, on_bytes), no_dist=True
            )
    except dcp.api.CheckpointException as exc:
        raise _original(exc) from None
    data = sorted(n for n in os.listdir(folder) if n.endswith(DEFAULT_SUFFIX))
    return [DCP_PROVENANCE, *data, DCP_METADATA_FILE]


def _original(exc: dcp.api.CheckpointException) -> BaseException:
    """The error a writing step raised, which DCP wraps with its traceback: our own errors
    (a corrupt source tensor) and OSError (a full disk) keep their meaning and exit code."""
    for failure in exc.failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CkptSurgeonError | OSError):
            return inner
    return exc


class _LazyPlanner(DefaultSavePlanner):
    """DCP's default save planner over meta tensors; the data of each comes from its ref
    when the writer resolves it, so only the tensors being written are in memory."""

    def __init__(self, refs: dict[str, TensorRef], on_bytes: Callable[[int], None] | None):
        # No dedup across ranks (there is one) and no flattening (the names are flat already,
        # and kept exactly: a dotted name must not be read as a nested path).
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._refs = refs
        self._on_bytes = on_bytes

    def lookup_object(self, index: MetadataIndex) -> Any:
        ref = self._refs[index.fqn]
        tensor = ref.load()
        if self._on_bytes is not None:
            self._on_bytes(ref.nbytes)
        return tensor


class _GroupedWriter(FileSystemWriter):
    """DCP's file-system writer, with tensors grouped into data files of bounded size.

    ``single_file_per_rank`` puts every tensor into one file (all held in memory until it
    closes); without it each tensor gets its own file. Here files fill in table order
    (``order``: name -> position; DCP's plan comes sorted by name) up to ``file_size`` bytes. On a torch whose writer lacks the per-file queue this relies on, it
    falls back to one file per tensor, which bounds memory just as well.
    """

    def __init__(self, path: str, file_size: int, order: dict[str, int], **kwargs: Any) -> None:
        super().__init__(path, single_file_per_rank=False, **kwargs)
        self._file_size = file_size
        self._order = order

    def write_data(self, plan: SavePlan, planner: SavePlanner):
        write_files = getattr(self, "_write_data", None)
        if write_files is None:
            return super().write_data(plan, planner)
        files: queue.Queue = queue.Queue()
        items = sorted(plan.items, key=lambda item: self._order[item.index.fqn])
        for n, group in enumerate(_groups(items, self._file_size)):
            name = f"{plan.storage_data.prefix}{n}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, group))
        return write_files(planner, files)


def _groups(items: list[WriteItem], limit: int) -> list[list[WriteItem]]:
    """Consecutive items in groups of at most ``limit`` bytes (a larger item alone)."""
    groups: list[list[WriteItem]] = [[]]
    size = 0
    for item in items:
        nbytes = _item_bytes(item)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    return [g for g in groups if g]


def _item_bytes(item: WriteItem) -> int:
    data = item.tensor_data
    if data is None:
        return 0
    return data.size.numel() * dtype_itemsize(data.properties.dtype)
