"""The Hugging Face folder layout an output folder follows, and the files that make it load.

A folder output holds ``model.safetensors`` (or shards and their index); for
``from_pretrained(output)`` to work it also needs the model's ``config.json`` and, for a
model with a tokenizer or an image processor, their files. They are carried along from a
folder source (``output.copy_extras``), and a transformers target writes its own
``config.json``. No torch import: the atomic writer checks these names too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from ckptsurgeon.errors import CkptSurgeonError, InputError
from ckptsurgeon.paths import within

SHARD_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"

# What from_pretrained reads beside the weights (transformers' and tokenizers' names).
EXTRA_FILES = re.compile(
    r"config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|added_tokens\.json|vocab\.txt|vocab\.json|merges\.txt|"
    r"[^/]*\.model|chat_template\.jinja|chat_template\.json|preprocessor_config\.json",
    re.ASCII,
)
WEIGHT_FILES = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|" + re.escape(SHARD_INDEX), re.ASCII
)
# A DCP folder output: DCP's data files and metadata, and the provenance ckptsurgeon records
# beside them (DCP's metadata has no room for it, and reading it back would need torch).
DCP_PROVENANCE = "ckptsurgeon.json"
DCP_FILES = re.compile(r"\.metadata|__\d+_\d+\.distcp|" + re.escape(DCP_PROVENANCE), re.ASCII)


def is_weight_file(name: str) -> bool:
    """Is this one of the weight files (or the index) a folder output writes?"""
    return bool(WEIGHT_FILES.fullmatch(name))


def is_output_file(name: str) -> bool:
    """Is this a file a folder output writes (weights, or extras carried along, or a DCP
    output's files)?"""
    return bool(
        WEIGHT_FILES.fullmatch(name) or EXTRA_FILES.fullmatch(name) or DCP_FILES.fullmatch(name)
    )


def output_metadata(path: str) -> dict[str, str]:
    """The metadata a safetensors output records (a file, or a folder's index or single
    ``model.safetensors``), or a DCP output beside its data; empty for anything else,
    missing or unreadable."""
    from ckptsurgeon.formats.safetensors_header import read_header

    try:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, DCP_PROVENANCE)):
            with open(os.path.join(path, DCP_PROVENANCE), encoding="utf-8") as f:
                metadata = json.load(f)
            return metadata if isinstance(metadata, dict) else {}
        if os.path.isdir(path):
            index = os.path.join(path, SHARD_INDEX)
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    metadata = json.load(f).get("metadata") or {}
                return metadata if isinstance(metadata, dict) else {}
            path = os.path.join(path, "model.safetensors")
        if not path.endswith(".safetensors") or not os.path.isfile(path):
            return {}
        return read_header(path).metadata
    except (OSError, ValueError, AttributeError, CkptSurgeonError):
        return {}  # unreadable or foreign: treated as not ours


def written_by_ckptsurgeon(folder: str) -> bool:
    """Do the folder's weights record ckptsurgeon as their producer (an earlier output,
    whose extras it wrote too)?"""
    return str(output_metadata(folder).get("producer", "")).startswith("ckptsurgeon ")


def _allowed_roots(folder: str) -> list[str]:
    """Where a source folder's files may really lie: the folder itself, and for a Hugging
    Face cache snapshot (``models--org--name/snapshots/<rev>``) that repository's blobs."""
    real = os.path.realpath(folder)
    roots = [real]
    snapshots = os.path.dirname(real)
    if os.path.basename(snapshots) == "snapshots":
        roots.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    return roots


def extras_in(folder: str) -> list[str]:
    """The files of ``folder`` a loadable output carries along, checked: a link may only
    point inside the folder (or, for a cache snapshot, into its blobs)."""
    found = []
    roots = _allowed_roots(folder)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not EXTRA_FILES.fullmatch(name) or not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if not any(within(real, root) for root in roots):
            raise InputError(
                f"{path} links outside {folder} ({real}); not copied: copy it by hand or "
                "set output.copy_extras: false"
            )
        found.append(path)
    return found


def copy_extras(files: list[str], dest: str, durable: bool) -> list[str]:
    """Copy ``files`` (from :func:`extras_in`) into ``dest`` as the files they name, each
    fsync'd when ``durable`` (the weights beside them are)."""
    from ckptsurgeon.formats.fsync import fsync_file

    copied = []
    for path in files:
        target = os.path.join(dest, os.path.basename(path))
        with open(os.path.realpath(path), "rb") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
            if durable:
                fsync_file(out)
        copied.append(os.path.basename(path))
    return copied


def write_model_config(model: Any, dest: str, dtype: str | None) -> bool:
    """Write a transformers model's own ``config.json`` (as ``save_pretrained`` does:
    architectures and dtype set) into ``dest``; False for a model that has none."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        return False
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.to_json_file(os.path.join(dest, CONFIG))
    return True
