"""The Python API: what the CLI does, as functions.

Every command has its function (:mod:`ckptsurgeon.commands`, re-exported here), taking the
command's options and returning a value whose ``to_dict()`` is what the command prints with
``--json``; ``load``, ``load_into`` and ``save`` are the library's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch

from ckptsurgeon.commands import apply, check, convert, diff, finetune, inspect, validate, verify
from ckptsurgeon.engine.load import load_into
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.formats.table import LazyStateDict
from ckptsurgeon.formats.writer import WriteResult, provenance, write_checkpoint

__all__ = [
    "apply",
    "check",
    "convert",
    "diff",
    "finetune",
    "inspect",
    "load",
    "load_into",
    "save",
    "validate",
    "verify",
]


def load(
    path: str | os.PathLike,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
    *,
    device: str | None = None,
) -> LazyStateDict:
    """A lazy mapping name -> tensor; each tensor is read when it is asked for, and moved
    to ``device`` when given (``"cuda"``, ``"meta"`` ...)."""
    return LazyStateDict(open_checkpoint(path, key, allow_globals).tensors, device)


def save(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    max_shard_size: str | int | None = None,
    metadata: dict[str, str] | None = None,
    durable: bool = True,
    format: str | None = None,
) -> WriteResult:
    """Write ``tensors`` as ``load`` reads them: ``format`` (safetensors, torch, dcp) or the
    suffix picks the format (a path with no suffix is a Hugging Face folder, sharded past
    ``max_shard_size``), atomically and streamed by the same writer as ``apply``. Tensors
    sharing storage (tied weights) are written once each, as safetensors requires."""
    from ckptsurgeon.formats.table import from_tensor

    table = {name: from_tensor(t.detach().cpu(), name) for name, t in tensors.items()}
    return write_checkpoint(
        table,
        os.fspath(path),
        max_shard_size=max_shard_size,
        metadata=provenance("ckptsurgeon.save", metadata),
        durable=durable,
        format=format,
    )
