"""The Python API: what the CLI does, as functions."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ckptsurgeon.engine.load import load_into
from ckptsurgeon.engine.ranks import on_rank_zero
from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats.atomic import refuse_overwriting_inputs
from ckptsurgeon.formats.prehash import SourceDigests
from ckptsurgeon.formats.reader import open_checkpoint
from ckptsurgeon.formats.table import LazyStateDict, cast_floating, parse_dtype
from ckptsurgeon.formats.writer import Progress, WriteResult, provenance, write_checkpoint

__all__ = ["apply", "check", "convert", "load", "load_into", "save", "verify"]


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


@on_rank_zero
def convert(
    source: str,
    output: str,
    *,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
    progress: Progress | None = None,
    durable: bool = True,
    prehashed: SourceDigests | None = None,
    format: str | None = None,
) -> WriteResult:
    """Rewrite ``source`` into ``format`` (safetensors, torch, dcp) or the one ``output``'s
    suffix names, optionally casting floating tensors to ``dtype`` and sharding a folder
    output. ``prehashed``: see :func:`~ckptsurgeon.formats.write_checkpoint`.

    Under torchrun rank 0 converts while the other ranks wait, and every rank returns what
    rank 0 wrote (see :mod:`ckptsurgeon.engine.ranks`)."""
    ckpt = open_checkpoint(source, key, allow_globals)
    refuse_overwriting_inputs(output, [source, *ckpt.files])
    table = ckpt.tensors
    if dtype is not None:
        try:
            target = parse_dtype(dtype)
        except ValueError as exc:
            raise UsageError(f"--dtype: {exc}") from None
        if not target.is_floating_point:
            raise UsageError(
                f"--dtype {dtype}: --dtype converts every floating tensor, so it takes a "
                "floating-point dtype (bfloat16, float16, float32, ...)"
            )
        table = cast_floating(table, target)
    return write_checkpoint(
        table,
        output,
        max_shard_size=max_shard_size,
        metadata=provenance(source),
        progress=progress,
        durable=durable,
        prehashed=prehashed,
        format=format,
    )


def apply(
    rules: str | os.PathLike | Mapping[str, Any],
    *,
    source: str | None = None,
    output: str | None = None,
    dry_run: bool = False,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> dict:
    """Run a rules file as ``ckptsurgeon apply`` does; returns the report (a dict).

    ``rules`` is a path, or the document itself as a mapping (``{"source": ..., "rules":
    [...]}``, paths in it relative to the working directory). Raises
    :class:`~ckptsurgeon.errors.FitError` when the result does not fit the target (nothing
    is written), RulesError for invalid rules, InputError for bad input.
    """
    from ckptsurgeon.job import Job, ReadOptions

    read = ReadOptions(key, tuple(allow_globals))
    if isinstance(rules, Mapping):
        job = Job.from_mapping(rules, source=source, output=output, read=read)
    else:
        job = Job.from_file(rules, source=source, output=output, read=read)
    return job.run(dry_run=dry_run).to_dict()


def check(
    path: str | os.PathLike,
    target: str,
    *,
    kwargs: dict | None = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
):
    """Would ``path`` load strictly into ``target`` (a model spec, checkpoint or manifest)?
    Returns a :class:`~ckptsurgeon.targets.check.CheckResult`."""
    import json

    from ckptsurgeon.targets.check import check_table
    from ckptsurgeon.targets.spec import target_from_cli

    info = target_from_cli(target, json.dumps(kwargs) if kwargs else None, allow_globals)
    return check_table(open_checkpoint(path, key, allow_globals).tensors, info)


def verify(
    rules: str | os.PathLike,
    *,
    output: str | None = None,
    source: str | None = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> dict:
    """Run a rules file's ``verify:`` section on its written output (``output`` overrides
    the file's); returns the verification report (a dict with ``ok``), as
    ``ckptsurgeon verify`` prints it."""
    from ckptsurgeon.job import Job, ReadOptions

    job = Job.from_file(
        rules, source=source, output=output, read=ReadOptions(key, tuple(allow_globals))
    )
    return job.verify().to_dict()
