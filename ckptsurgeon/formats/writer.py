"""Writing a table as any format family writes it (safetensors files and Hugging Face
folders, torch pickles, DCP folders, a plug-in's), atomically (through
:mod:`ckptsurgeon.formats.atomic`): the output path only ever holds a complete checkpoint,
the old one or the new one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ckptsurgeon._version import __version__
from ckptsurgeon.errors import OutputError, UsageError
from ckptsurgeon.formats import prehash, registry
from ckptsurgeon.formats.atomic import atomic_path, check_replaceable
from ckptsurgeon.formats.family import Output, WriteRequest

if TYPE_CHECKING:
    from ckptsurgeon.formats.prehash import SourceDigests
    from ckptsurgeon.formats.table import Table, TensorRef

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def provenance(source: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Metadata recorded in every output: which tool wrote it, and from what."""
    return {
        "producer": f"ckptsurgeon {__version__}",
        "source": os.path.basename(source),
        **(extra or {}),
    }


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal, as Hugging Face), ``"2GiB"`` -> 2 * 2**30."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if not match:
            raise UsageError(f"size {size!r}: expected a number with a unit such as 5GB or 500MiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise UsageError(f"size {size!r} must be positive")
    return value


def check_output(
    path: str,
    max_shard_size: int | str | None = None,
    names: Iterable[str] = (),
    format: str | None = None,
) -> str:
    """The kind of output ``path`` names, or the error ``write_checkpoint`` would raise for
    it and tensors called ``names`` (lets a dry run fail exactly where the real run would):
    UsageError for a bad path, format or shard size or an existing path it may not replace
    (:func:`check_replaceable`), FitError for a name the format cannot hold."""
    return _checked_output(path, max_shard_size, names, format)[1].kind


def _checked_output(
    path: str, max_shard_size: int | str | None, names: Iterable[str], format: str | None
) -> tuple[registry.Family, Output]:
    """:func:`check_output`'s checks; the family and output that will be written."""
    family, output = registry.output_for(path, format)
    if max_shard_size is not None:
        if not output.folder:
            raise UsageError("max_shard_size needs a folder output (a path with no suffix)")
        parse_size(max_shard_size)
    check_replaceable(os.path.abspath(path), is_dir=output.folder)
    family.format.check_names(list(names))
    return family, output


def plan_shards(
    items: list[tuple[str, TensorRef]], max_size: int
) -> list[list[tuple[str, TensorRef]]]:
    """Hugging Face's greedy rule: in key order, start a new shard when the next tensor
    would push the current one past ``max_size``; a larger tensor sits alone."""
    shards: list[list[tuple[str, TensorRef]]] = [[]]
    current = 0
    for name, ref in items:
        if shards[-1] and current + ref.nbytes > max_size:
            shards.append([])
            current = 0
        shards[-1].append((name, ref))
        current += ref.nbytes
    return shards


class Progress(Protocol):
    """Receives the total bytes to write, then each tensor's bytes as it is written."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


@dataclass(frozen=True)
class WriteResult:
    path: str
    kind: str
    files: list[str]
    total_bytes: int


def write_checkpoint(
    table: Table,
    path: str,
    *,
    max_shard_size: int | str | None = None,
    metadata: dict[str, str] | None = None,
    progress: Progress | None = None,
    durable: bool = True,
    prehashed: SourceDigests | None = None,
    before_commit: Callable[[str], None] | None = None,
    format: str | None = None,
) -> WriteResult:
    """Write ``table`` to ``path`` atomically; ``format``, or else the suffix, picks the
    format family and its output (see :func:`~ckptsurgeon.formats.registry.output_for`).
    A ``max_shard_size`` shards a folder output into safetensors files with an index; for
    a DCP folder it caps each data file, which is also the most tensor data the write
    holds in memory at once.

    ``durable`` fsyncs files and folders before and after the rename, so the output survives
    a power cut too; without it the write is still atomic against crashes of this process
    (kill -9), and costs what ``cp -r`` costs instead of waiting for the disk.
    Digests of source tensors hashed ahead (:class:`~ckptsurgeon.formats.prehash.SourceDigests`
    started for the source) are found by file identity; ``prehashed`` names one to use
    even when it was not started that way.
    ``before_commit`` is called with the temporary file or folder once every byte is
    written, before it is moved into place; if it raises, nothing appears at ``path``.
    """
    family, output = _checked_output(path, max_shard_size, table.keys(), format)
    items = list(table.items())
    total = sum(ref.nbytes for _, ref in items)
    on_bytes = None
    if progress is not None:
        progress.start(total)
        on_bytes = progress.advance
    request = WriteRequest(
        output,
        dict(metadata or {}),
        parse_size(max_shard_size) if max_shard_size is not None else None,
        durable,
        on_bytes,
    )
    try:
        with (
            prehash.using(prehashed),
            atomic_path(path, is_dir=output.folder, durable=durable) as tmp,
        ):
            names = family.format.write(tmp, items, request)
            if before_commit is not None:
                before_commit(tmp)
    except OSError as exc:
        raise OutputError(
            f"writing {path} failed, nothing was written: {exc.strerror or exc}"
        ) from None
    files = [os.path.join(path, n) for n in names] if output.folder else [path]
    return WriteResult(path, output.kind, files, total)
