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
from ckptsurgeon.formats.table import Table, TensorRef

METADATA_FILE = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, set[str] | None] = {
    _DCP_METADATA: None,  # its dataclasses and enums; None = any name in the module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if is_dtype or (allowed is None and not name.startswith("__")) or name in (allowed or ()):
            return super().find_class(module, name)
        raise UnsafeInputError(f"DCP metadata needs {module}.{name}, which is not admitted")


def is_dcp_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def open_dcp(folder: str) -> Table:
    """A lazy table over a DCP folder: every tensor entry, chunks stitched on load."""
    meta_path = os.path.join(folder, METADATA_FILE)
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
