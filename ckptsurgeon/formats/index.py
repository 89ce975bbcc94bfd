"""Hugging Face sharded layouts: ``*.safetensors.index.json`` and ``*.bin.index.json``."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ckptsurgeon.errors import InputError

_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ShardIndex:
    """A validated index: tensor name -> shard path (inside the index's folder)."""

    path: str
    weight_map: dict[str, str]
    metadata: dict

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))


def check_relative_name(index_path: str, name: str) -> None:
    """A file named by an index must be a plain relative name inside its folder.

    Checked lexically: symbolic links are allowed (the Hugging Face cache links snapshot
    files to blobs), so what is checked is the name written, not where a link points.
    """
    parts = name.split("/")
    if (
        not name
        or "\\" in name
        or name.startswith("/")
        or _DRIVE.match(name)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise InputError(f"{index_path}: file name {name!r} is not a plain relative name")


def check_shard_name(index_path: str, name: str, suffix: str) -> None:
    """A shard name: a plain relative name (see check_relative_name) with the index's suffix."""
    check_relative_name(index_path, name)
    if not name.endswith(suffix):
        raise InputError(f"{index_path}: shard {name!r} does not end with {suffix}")


def read_index(index_path: str) -> ShardIndex:
    """Parse and validate a sharded-checkpoint index; every named shard must exist."""
    suffix = ".safetensors" if index_path.endswith(".safetensors.index.json") else ".bin"
    try:
        with open(index_path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{index_path}: not a JSON index ({exc})") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(f"{index_path}: needs a 'weight_map' object of name -> shard file")
    folder = os.path.dirname(index_path)
    for shard in dict.fromkeys(weight_map.values()):
        check_shard_name(index_path, shard, suffix)
        if not os.path.isfile(os.path.join(folder, shard)):
            raise InputError(f"{index_path}: shard {shard!r} is missing")
    metadata = obj.get("metadata") or {}
    return ShardIndex(
        index_path,
        {k: os.path.join(folder, v) for k, v in weight_map.items()},
        metadata if isinstance(metadata, dict) else {},
    )


def find_index(folder: str) -> str | None:
    """The one index file in ``folder``, preferring safetensors; InputError if ambiguous."""
    names = sorted(os.listdir(folder))
    for suffix in (".safetensors.index.json", ".bin.index.json"):
        found = [n for n in names if n.endswith(suffix)]
        if len(found) > 1:
            raise InputError(f"{folder}: several index files ({', '.join(found)}); name one")
        if found:
            return os.path.join(folder, found[0])
    return None
