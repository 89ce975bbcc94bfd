"""torch.distributed.checkpoint folders, read without torch's plain ``pickle.load``.

DCP's own reader unpickles ``.metadata`` with no restriction, so a hostile folder could run
code. Here the metadata goes through an unpickler that admits only DCP's metadata classes,
and each tensor chunk goes through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch

from ckptsurgeon.errors import InputError, UnsafeInputError
from ckptsurgeon.formats.checkpoint import DCP_METADATA_FILE
from ckptsurgeon.formats.index import check_relative_name
from ckptsurgeon.formats.table import Table, TensorRef

# Exactly the classes DCP metadata pickles reference; anything else is refused. Names are
# checked literally (no dotted paths, which pickle would otherwise follow attribute by
# attribute to reach, say, ``os.system`` through a module's imports).
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if "." not in name and (is_dtype or name in _ALLOWED.get(module, ())):
            return super().find_class(module, name)
        raise UnsafeInputError(f"DCP metadata needs {module}.{name}, which is not admitted")


def open_dcp(folder: str) -> Table:
    """A lazy table over a DCP folder: every tensor entry, chunks stitched on load."""
    meta_path = os.path.join(folder, DCP_METADATA_FILE)
    try:
        with open(meta_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except UnsafeInputError as exc:
        raise UnsafeInputError(f"{folder}: {exc}") from None
    except Exception as exc:  # any unpickling failure means a corrupt metadata file
        raise InputError(f"{meta_path}: corrupt DCP metadata ({type(exc).__name__})") from None
    try:
        entries = metadata.state_dict_metadata
        storage = metadata.storage_data
    except AttributeError:
        raise InputError(f"{meta_path}: not DCP metadata") from None

    chunks: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage.items():
        check_relative_name(meta_path, str(info.relative_path))
        chunks.setdefault(index.fqn, []).append((index, info))

    table: Table = {}
    for fqn, entry in entries.items():
        if type(entry).__name__ != "TensorStorageMetadata":
            continue  # BytesStorageMetadata: non-tensor values (step counters, ...)
        shape = tuple(entry.size)
        dtype = entry.properties.dtype
        table[fqn] = TensorRef(
            shape, dtype, _chunk_loader(folder, shape, dtype, chunks.get(fqn, [])), None, (fqn,)
        )
    return table


def _chunk_loader(folder: str, shape: tuple[int, ...], dtype: torch.dtype, parts: list):
    def load() -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        covered = 0
        for index, info in parts:
            if getattr(info, "transform_descriptors", None):
                raise InputError(f"{folder}: transformed (compressed) DCP chunks are not supported")
            path = os.path.join(folder, info.relative_path)
            with open(path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            if len(blob) != info.length:
                raise InputError(f"{path}: file ended early (truncated?)")
            try:
                chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise InputError(f"{path}: corrupt DCP chunk ({type(exc).__name__})") from None
            view = out
            for dim, start in enumerate(index.offset or ()):
                view = view.narrow(dim, start, chunk.shape[dim])
            view.copy_(chunk)
            covered += chunk.numel()
        if covered != out.numel():
            raise InputError(f"{folder}: DCP chunks cover {covered} of {out.numel()} elements")
        return out

    return load
