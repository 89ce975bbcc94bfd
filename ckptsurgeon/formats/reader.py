"""Open any supported checkpoint as a lazy table; the format is found from bytes and layout."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats import dcp_io, gguf_io, hub, safetensors_io, torch_io, zero_io
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.formats.checkpoint import (
    Checkpoint,
    choose_prefix_container,
    detect_format,
    open_in_snapshot,
    reading,
    resolve_file,
)
from ckptsurgeon.formats.header_table import SAFETENSORS_FORMATS, read_safetensors
from ckptsurgeon.formats.index import read_index
from ckptsurgeon.formats.table import Table, from_tensor
from ckptsurgeon.formats.zero_folder import ZERO_FORMATS


def open_checkpoint(
    path: str | os.PathLike, key: str | None = None, allow_globals: Iterable[str] = ()
) -> Checkpoint:
    """Open ``path`` lazily: headers and indexes are read, tensor data is not.

    ``key`` picks a nested container (``state_dict``, ``model``, ``a/b`` for deeper ones);
    without it the state dict is found automatically and ``Checkpoint.note`` says how.
    ``hf://org/name[@revision]`` opens that model's snapshot in the Hugging Face cache
    (offline); ``Checkpoint.path`` is then the hf:// name, ``files`` the snapshot's files.
    """
    path = os.fspath(path)
    if hub.is_hf(path):
        return open_in_snapshot(path, lambda folder: open_checkpoint(folder, key, allow_globals))
    torch_io.resolve_allowed_globals(allow_globals)  # a bad --allow-global is an error everywhere
    with reading(path):
        fmt = detect_format(path)
        file = resolve_file(path)
        if fmt in SAFETENSORS_FORMATS:
            ckpt = read_safetensors(path, fmt, file, safetensors_io.open_safetensors)
        elif fmt == "dcp":
            ckpt = Checkpoint(path, fmt, dcp_io.open_dcp(file), files=_folder_files(file))
        elif fmt == "torch-sharded":
            ckpt = _open_sharded_torch(path, file, allow_globals)
        elif fmt == "gguf":
            ckpt = gguf_io.open_gguf(file)
        elif fmt in ZERO_FORMATS:
            ckpt = zero_io.open_zero(file)
        else:
            ckpt = _open_torch(path, file, fmt, key, allow_globals)
            key = None  # the container was chosen inside the pickle
    if fmt in ("dcp", "safetensors", "safetensors-sharded", "torch-sharded", "gguf", *ZERO_FORMATS):
        choose_prefix_container(ckpt, key)
    return ckpt


def _folder_files(folder: str) -> list[str]:
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))]


def _open_sharded_torch(path: str, index_path: str, allow_globals: Iterable[str]) -> Checkpoint:
    index = read_index(index_path)
    table: Table = {}
    for shard in index.shards:
        obj = torch_io.load_pickle(shard, allow_globals)
        if not isinstance(obj, Mapping):
            raise InputError(f"{shard}: shard is not a mapping of tensors")
        for name, value in obj.items():
            if index.weight_map.get(name) != shard:
                raise InputError(
                    f"{index_path}: {name!r} is in {shard} but the index says "
                    f"{index.weight_map.get(name, 'nothing')}"
                )
            if isinstance(value, torch.Tensor):
                table[name] = from_tensor(value, name)
    missing = [n for n in index.weight_map if n not in table]
    if missing:
        raise InputError(
            f"{index_path}: {len(missing)} indexed tensors are in no shard (first: {missing[0]!r})"
        )
    return Checkpoint(path, "torch-sharded", table, files=[index_path, *index.shards])


def _open_torch(
    path: str, file: str, fmt: str, key: str | None, allow_globals: Iterable[str]
) -> Checkpoint:
    obj = torch_io.load_pickle(file, allow_globals)
    if isinstance(obj, torch.Tensor):
        obj = {"tensor": obj}
    containers = torch_io.find_containers(obj)
    if not containers and key is None:
        raise InputError(
            f"{path}: no tensors found (a pickled {type(obj).__name__}, not a state dict)"
        )
    chosen, note = torch_io.choose_container(containers, key)
    state = containers[chosen]
    table: Table = {}
    seen: dict[tuple[int, int, tuple, tuple], str] = {}
    aliases: dict[str, str] = {}
    skipped = densified = 0
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            skipped += 1
            continue
        name = str(name)
        if value.layout != torch.strided:  # sparse buffers: no format here stores them as such
            table[name] = from_tensor(value.detach().to_dense(), name, Action("read", "as dense"))
            densified += 1
            continue
        table[name] = from_tensor(value.detach(), name)
        ident = (
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
        )
        if value.numel() and ident in seen:
            aliases[name] = seen[ident]
        else:
            seen[ident] = name
    if skipped:
        note += f"; {skipped} non-tensor entries skipped"
    if densified:
        note += f"; {densified} sparse tensors read as dense"
    return Checkpoint(
        path,
        fmt,
        table,
        containers=list(containers),
        container=chosen or None,
        note=note,
        files=[file],
        aliases=aliases,
    )
