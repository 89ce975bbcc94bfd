"""Writers: safetensors (one file or a Hugging Face sharded folder), torch and DCP folders,
atomically (through :mod:`ckptsurgeon.formats.atomic`): the output path only ever holds a
complete checkpoint, the old one or the new one.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from ckptsurgeon._version import __version__
from ckptsurgeon.errors import FitError, OutputError, UsageError
from ckptsurgeon.formats import dcp_writer, safetensors_io, safetensors_writer
from ckptsurgeon.formats.atomic import atomic_path, check_replaceable
from ckptsurgeon.formats.fsync import fsync_file
from ckptsurgeon.formats.hf_folder import SHARD_INDEX
from ckptsurgeon.formats.kinds import FOLDER_KINDS, output_kind
from ckptsurgeon.formats.prehash import SourceDigests
from ckptsurgeon.formats.safetensors_header import METADATA_KEY
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
    kind = output_kind(path, format)
    if max_shard_size is not None:
        if kind not in FOLDER_KINDS:
            raise UsageError("max_shard_size needs a folder output (a path with no suffix)")
        parse_size(max_shard_size)
    check_replaceable(os.path.abspath(path), is_dir=kind in FOLDER_KINDS)
    if kind in ("safetensors", "folder") and METADATA_KEY in names:
        raise FitError(
            f"a tensor is named {METADATA_KEY!r}, which safetensors keeps for the file's "
            "metadata; rename it with a rule, or write a .pt output"
        )
    return kind


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
    format (see output_kind). A ``max_shard_size`` shards a folder output into safetensors
    files with an index; for a DCP folder it caps each data file, which is also the most
    tensor data the write holds in memory at once.

    ``durable`` fsyncs files and folders before and after the rename, so the output survives
    a power cut too; without it the write is still atomic against crashes of this process
    (kill -9), and costs what ``cp -r`` costs instead of waiting for the disk.
    ``prehashed``: digests of source tensors already computed (safetensors outputs).
    ``before_commit`` is called with the temporary file or folder once every byte is
    written, before it is moved into place; if it raises, nothing appears at ``path``.
    """
    kind = check_output(path, max_shard_size, table.keys(), format)
    provenance_only = dict(metadata or {})
    metadata = {"format": "pt", **provenance_only}  # "pt": the safetensors convention
    items = list(table.items())
    total = sum(ref.nbytes for _, ref in items)
    on_bytes = None
    if progress is not None:
        progress.start(total)
        on_bytes = progress.advance
    try:
        with atomic_path(path, is_dir=kind in FOLDER_KINDS, durable=durable) as tmp:
            if kind == "safetensors":
                safetensors_writer.write_safetensors(
                    tmp, items, metadata, on_bytes, sync=durable, prehashed=prehashed
                )
                files = [path]
            elif kind == "torch":
                _write_torch(tmp, items, on_bytes, durable)
                files = [path]
            elif kind == "dcp":
                file_size = (
                    parse_size(max_shard_size)
                    if max_shard_size is not None
                    else dcp_writer.DEFAULT_FILE_SIZE
                )
                names = dcp_writer.write_dcp(
                    tmp, items, provenance_only, on_bytes, sync=durable, file_size=file_size
                )
                files = [os.path.join(path, n) for n in names]
            else:
                names = _write_folder(
                    tmp, items, max_shard_size, metadata, on_bytes, durable, prehashed
                )
                files = [os.path.join(path, n) for n in names]
            if before_commit is not None:
                before_commit(tmp)
    except OSError as exc:
        raise OutputError(
            f"writing {path} failed, nothing was written: {exc.strerror or exc}"
        ) from None
    return WriteResult(path, kind, files, total)


def _write_torch(tmp: str, items: list[tuple[str, TensorRef]], on_bytes, sync: bool) -> None:
    state = {}
    for name, ref in items:
        tensor = ref.load()
        # A view into a bigger storage (one part of a split) would save the whole storage.
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        state[name] = tensor
        if on_bytes:
            on_bytes(ref.nbytes)
    with open(tmp, "wb") as f:
        sink = _RecordingWriter(f)
        try:
            torch.save(state, sink)
        except RuntimeError as exc:
            # torch turns a failed write (a full disk) into "unexpected pos 704 vs 598";
            # report the operating system's error instead.
            if sink.error is not None:
                raise sink.error from None
            raise OSError(errno.EIO, f"torch.save failed: {str(exc).strip()[:200]}") from None
        if sync:
            fsync_file(f)


class _RecordingWriter:
    """A binary file for ``torch.save`` that remembers the first OSError a write raised."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()


def _write_folder(
    tmp: str, items, max_shard_size, metadata, on_bytes, sync: bool, prehashed
) -> list[str]:
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards = plan_shards(items, limit) if limit else [items]
    if len(shards) == 1:
        safetensors_writer.write_safetensors(
            os.path.join(tmp, "model.safetensors"),
            items,
            metadata,
            on_bytes,
            sync=sync,
            prehashed=prehashed,
        )
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    digests = safetensors_writer.write_safetensors_files(
        [(os.path.join(tmp, name), shard) for name, shard in zip(names, shards, strict=True)],
        metadata,
        on_bytes,
        sync=sync,
        prehashed=prehashed,
    )
    weight_map = {n: name for name, shard in zip(names, shards, strict=True) for n, _ in shard}
    index = {
        "metadata": {
            "total_size": sum(ref.nbytes for _, ref in items),
            **metadata,
            # each shard's content digest (inspect --verify)
            safetensors_io.DIGEST_KEY: dict(zip(names, digests, strict=True)),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(tmp, SHARD_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        if sync:
            fsync_file(f)
    return [*names, SHARD_INDEX]
