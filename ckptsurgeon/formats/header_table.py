"""safetensors checkpoints read from their headers alone, without torch (for ``inspect``).

Every safetensors checkpoint (a file, a Hugging Face folder with one ``model.safetensors``
or shards and their index, an ``hf://`` model) becomes a
:class:`~ckptsurgeon.formats.checkpoint.Checkpoint` in :func:`read_safetensors`, given a
function that turns one file's header into tensor entries:
:func:`~ckptsurgeon.formats.reader.open_checkpoint` gives it one making lazy torch refs,
:func:`open_header_checkpoint` one making :class:`HeaderTensor` records (torch's dtype name
and its item size, from tables). The header validation, the index checks, the errors and
the Checkpoint's fields are therefore the same either way, and so is what ``inspect``
prints from them; where that is not certain, :func:`open_header_checkpoint` returns None
and the caller opens the checkpoint with torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats import hub
from ckptsurgeon.formats.checkpoint import (
    Checkpoint,
    detect,
    open_detected,
    open_in_snapshot,
    reading,
)
from ckptsurgeon.formats.index import read_index
from ckptsurgeon.formats.safetensors_header import (
    DTYPE_BITS,
    TORCH_DTYPE_NAMES,
    Header,
    read_header,
)

# torch dtypes newer than the oldest torch ckptsurgeon supports (2.6): whether a file
# holding one can be read depends on the torch installed, so only torch can say.
_NEWER_THAN_OLDEST_TORCH = frozenset({"float8_e8m0fnu"})  # torch 2.7

T = TypeVar("T")


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor as a safetensors header describes it (no data, no torch dtype)."""

    shape: tuple[int, ...]
    dtype: str  # torch's name for it: "float32", "bfloat16"
    itemsize: int  # bytes per element

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class NeedsTorch(Exception):
    """A dtype only the installed torch can say it holds (or not)."""


def header_tensors(path: str, header: Header) -> dict[str, HeaderTensor]:
    """The tensors of ``path``'s validated ``header`` as records, in the file's order.

    Raises :class:`NeedsTorch` for a dtype torch may not have (F4, F6, F8_E8M0)."""
    table: dict[str, HeaderTensor] = {}
    for name, info in header.tensors.items():
        dtype = TORCH_DTYPE_NAMES.get(info["dtype"])
        if dtype is None or dtype in _NEWER_THAN_OLDEST_TORCH:
            raise NeedsTorch(f"{path}: tensor {name!r}: {info['dtype']}")
        table[name] = HeaderTensor(tuple(info["shape"]), dtype, DTYPE_BITS[info["dtype"]] // 8)
    return table


def read_safetensors(
    path: str, fmt: str, file: str, open_file: Callable[[str, Header], dict[str, T]]
) -> Checkpoint[T]:
    """The checkpoint ``path`` names, held in the safetensors ``file`` or in the shards a
    ``*.safetensors.index.json`` ``file`` lists, as format ``fmt``, with
    ``open_file(file, header)`` giving each file's tensors: a folder's shard by shard in
    the order of their names (the order they were written in), each in its file's order.

    Every header is validated; every tensor must be in the shard the index names for it,
    and every tensor the index names in some shard (InputError otherwise)."""
    if not file.endswith(".index.json"):
        header = read_header(file)
        return Checkpoint(
            path, fmt, open_file(file, header), metadata=header.metadata, files=[file]
        )
    index = read_index(file)
    table: dict[str, T] = {}
    # model-00001-of-00003... : not in the order the index's (sorted) names first meet them.
    for shard in sorted(index.shards):
        header = read_header(shard)
        for name in header.tensors:
            if index.weight_map.get(name) != shard:
                raise InputError(
                    f"{file}: {name!r} is in {shard} but the index says "
                    f"{index.weight_map.get(name, 'nothing')}"
                )
        table.update(open_file(shard, header))
    missing = [n for n in index.weight_map if n not in table]
    if missing:
        raise InputError(
            f"{file}: {len(missing)} indexed tensors are in no shard (first: {missing[0]!r})"
        )
    return Checkpoint(path, fmt, table, files=[file, *index.shards])


def open_header_checkpoint(path: str) -> Checkpoint[HeaderTensor] | None:
    """What ``open_checkpoint(path)`` opens, with tensors described from headers alone and
    without importing torch (:class:`HeaderTensor` for safetensors, or what a family's
    ``open_header`` gives): the same fields, or the same error. None when the family cannot
    (every format but safetensors, or a dtype only torch can judge); the caller then opens
    ``path`` with :func:`~ckptsurgeon.formats.reader.open_checkpoint`.
    """
    if hub.is_hf(path):
        return open_in_snapshot(path, open_header_checkpoint)
    with reading(path):
        return open_detected(detect(path), path, header=True)
