"""Open any supported checkpoint as a lazy table; the format is found from bytes and layout."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ckptsurgeon.errors import InputError, UsageError
from ckptsurgeon.formats import dcp_io, hub, safetensors_io, torch_io
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.formats.index import find_index, read_index
from ckptsurgeon.formats.table import Table, from_tensor
from ckptsurgeon.formats.torch_io import TORCH_SUFFIXES


@dataclass
class Checkpoint:
    """An opened checkpoint: the lazy table plus what was learnt while opening it."""

    path: str
    format: str
    tensors: Table
    containers: list[str] = field(default_factory=list)
    container: str | None = None
    note: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # name -> name it shares storage with


def detect_format(path: str) -> str:
    """One of safetensors, safetensors-sharded, torch-zip, torch-legacy, torch-sharded, dcp.

    ``hf://org/name[@revision]`` is the snapshot folder in the Hugging Face cache."""
    if hub.is_hf(path):
        snapshot = hub.resolve(path)
        with hub.named_as(snapshot):
            return detect_format(snapshot.folder)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if dcp_io.is_dcp_folder(path):
            return "dcp"
        index = find_index(path)
        if index:
            return detect_format(index)
        return detect_format(_single_weights_file(path))
    if path.endswith(".index.json"):
        return (
            "safetensors-sharded" if path.endswith(".safetensors.index.json") else "torch-sharded"
        )
    size = os.path.getsize(path)
    if size == 0:
        raise InputError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    looks_safetensors = (
        len(head) == 9 and head[8:9] == b"{" and (struct.unpack("<Q", head[:8])[0] <= size - 8)
    )
    if looks_safetensors or path.endswith(".safetensors"):
        return "safetensors"
    if head[:1] == b"\x80" or path.endswith(TORCH_SUFFIXES):
        return "torch-legacy"
    raise InputError(
        f"{path}: unrecognised format (not safetensors, a torch file, an index or DCP)"
    )


def _single_weights_file(folder: str) -> str:
    names = sorted(os.listdir(folder))
    for preferred in ("model.safetensors", "pytorch_model.bin"):
        if preferred in names:
            return os.path.join(folder, preferred)
    for suffixes in ((".safetensors",), TORCH_SUFFIXES):
        found = [n for n in names if n.endswith(suffixes) and not n.startswith(".")]
        if len(found) == 1:
            return os.path.join(folder, found[0])
        if len(found) > 1:
            raise InputError(f"{folder}: several weight files ({', '.join(found)}); name one")
    raise InputError(f"{folder}: no checkpoint found (no index, weights file or DCP metadata)")


def resolve_file(path: str) -> str:
    """The file (or DCP folder) that holds the checkpoint at ``path``."""
    if os.path.isdir(path) and not dcp_io.is_dcp_folder(path):
        return find_index(path) or _single_weights_file(path)
    return path


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
        snapshot = hub.resolve(path)
        with hub.named_as(snapshot):
            ckpt = open_checkpoint(snapshot.folder, key, allow_globals)
        ckpt.path = snapshot.name
        return ckpt
    torch_io.resolve_allowed_globals(allow_globals)  # a bad --allow-global is an error everywhere
    try:
        fmt = detect_format(path)
        file = resolve_file(path)
        if fmt == "safetensors":
            header = safetensors_io.read_header(file)
            ckpt = Checkpoint(
                path,
                fmt,
                safetensors_io.open_safetensors(file, header),
                metadata=header.metadata,
                files=[file],
            )
        elif fmt == "safetensors-sharded":
            ckpt = _open_sharded_safetensors(path, file)
        elif fmt == "dcp":
            ckpt = Checkpoint(path, fmt, dcp_io.open_dcp(file), files=_folder_files(file))
        elif fmt == "torch-sharded":
            ckpt = _open_sharded_torch(path, file, allow_globals)
        else:
            ckpt = _open_torch(path, file, fmt, key, allow_globals)
            key = None  # the container was chosen inside the pickle
    except (OSError, struct.error) as exc:
        raise InputError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if fmt in ("dcp", "safetensors", "safetensors-sharded", "torch-sharded"):
        _choose_prefix_container(ckpt, key)
    return ckpt


def _folder_files(folder: str) -> list[str]:
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))]


def _open_sharded_safetensors(path: str, index_path: str) -> Checkpoint:
    index = read_index(index_path)
    table: Table = {}
    for shard in index.shards:
        header = safetensors_io.read_header(shard)
        for name in header.tensors:
            if index.weight_map.get(name) != shard:
                raise InputError(
                    f"{index_path}: {name!r} is in {shard} but the index says "
                    f"{index.weight_map.get(name, 'nothing')}"
                )
        table.update(safetensors_io.open_safetensors(shard, header))
    missing = [n for n in index.weight_map if n not in table]
    if missing:
        raise InputError(
            f"{index_path}: {len(missing)} indexed tensors are in no shard (first: {missing[0]!r})"
        )
    return Checkpoint(path, "safetensors-sharded", table, files=[index_path, *index.shards])


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


def _choose_prefix_container(ckpt: Checkpoint, key: str | None) -> None:
    """Flat formats (DCP, safetensors) nest containers as name prefixes: ``model.fc.weight``."""
    heads = {name.split(".", 1)[0] for name in ckpt.tensors}
    candidates = [h for h in torch_io.CONTAINER_PREFERENCE if h in heads]
    if (
        ckpt.format == "dcp"
        and heads
        and heads <= set(torch_io.CONTAINER_PREFERENCE) | {"optim", "optimizer"}
    ):
        ckpt.containers = sorted(heads)
        if key is None and candidates:
            key = candidates[0]
            ckpt.note = f"container {key!r} chosen (DCP entries are named '{key}.*')"
    if key is None:
        return
    prefix = key.replace("/", ".") + "."
    picked: Table = {
        n[len(prefix) :]: ref for n, ref in ckpt.tensors.items() if n.startswith(prefix)
    }
    if not picked:
        raise UsageError(f"--key {key!r}: no tensors named '{prefix}*' in {ckpt.path}")
    ckpt.tensors = picked
    ckpt.container = key
    ckpt.note = ckpt.note or f"container {key!r} chosen with --key"
