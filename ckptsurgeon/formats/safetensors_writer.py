"""The streaming safetensors writer: many files, one pool of workers, bounded memory.

Each output file is laid out before any data is written (its header, with zero-filled
placeholders for the digests, and every tensor's offset), so its tensors become independent
jobs that worker threads run in any order:

* a tensor whose bytes sit unchanged in a source file is copied. If its digest is known
  already (:mod:`~ckptsurgeon.formats.prehash` hashed it while the CLI started up), the kernel
  copies it with ``copy_file_range``, as ``cp`` does: one pass over the bytes, none of them
  through this process. That copy slows by half when source and output offsets differ modulo
  the page size (measured here), so each output header gets the few trailing spaces that line
  most copied bytes up with their source pages. Otherwise the tensor is read, hashed and
  written a megabyte at a time through one reused buffer per worker, each part written while
  still in the CPU cache from hashing it. (Mapping the source instead saves nothing, while a
  file truncated under us would kill the process with SIGBUS instead of raising.)
* any other tensor is materialised, hashed and written at its offset with ``pwrite``.

The calling thread submits jobs in data order across all files, keeps a few in flight and
at most ``MATERIALISED_BUDGET`` bytes of materialised tensors (one tensor always goes, however
large), takes the digests back in order, and closes each file (digests patched into its
header, fsync) as soon as its last job is done while the workers go on with the next file.
sha256, the copies and torch's kernels release the GIL, so the workers really run in parallel:
hashing costs more CPU than copying here, and this is what keeps a rename near ``cp`` speed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats import prehash
from ckptsurgeon.formats.prehash import SpanKey
from ckptsurgeon.formats.safetensors_io import (
    DIGEST_KEY,
    TENSOR_DIGESTS_KEY,
    content_digest,
    encode_header,
    layout,
    pad_header,
)
from ckptsurgeon.formats.spans import ByteSpan, CastSpan, open_span, read_exactly
from ckptsurgeon.formats.table import TensorRef

PART = 1 << 20  # bytes read, hashed and written at a time: stays in the CPU cache
KERNEL_COPY = 64 << 20  # bytes per copy_file_range call
MATERIALISED_BUDGET = 64 << 20
WORKERS = max(1, min(8, os.cpu_count() or 1))

Items = Sequence[tuple[str, TensorRef]]


def write_safetensors(
    path: str,
    items: Items,
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
    *,
    sync: bool = True,
) -> str:
    """Stream ``items`` into a new safetensors file at ``path``; returns its content digest.

    See :func:`write_safetensors_files`.
    """
    return write_safetensors_files([(path, items)], metadata, on_bytes, sync=sync)[0]


def write_safetensors_files(
    files: Sequence[tuple[str, Items]],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
    *,
    sync: bool = True,
) -> list[str]:
    """Write each ``(path, items)`` as a new safetensors file, all through one worker pool.

    Tensors are laid out as the reference writer does (widest dtype first, then by name).
    Every file records its content digest and each tensor's sha256 in its metadata (see
    :func:`~ckptsurgeon.formats.safetensors_io.content_digest`). ``on_bytes(n)`` is called
    after each tensor, in order (progress). With ``sync`` each file is fsynced before it is
    closed. Copies take the sha256 of source tensors hashed ahead of time where a running
    :class:`~ckptsurgeon.formats.prehash.SourceDigests` holds it for that very file. Returns the files' content digests, in order. On any
    error the jobs still queued are cancelled and the error propagates; the caller removes
    the partial files.
    """
    prehash.keep_only(_copied_spans(files))
    opened: list[_OutFile] = []
    in_flight: deque[tuple[Future[bytes], _OutFile, int, int]] = deque()
    held = 0  # bytes of materialised tensors in flight

    def finish_oldest() -> None:
        nonlocal held
        future, out, nbytes, cost = in_flight.popleft()
        out.digests.append(future.result())
        held -= cost
        if on_bytes:
            on_bytes(nbytes)
        if out.complete:
            out.close(sync)

    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="ckptsurgeon-write")
    try:
        for out, ref, offset in _interleaved(files, metadata, opened, sync):
            cost = 0 if _streamable(ref) else ref.nbytes
            while in_flight and (
                len(in_flight) >= 2 * WORKERS
                or (cost and held and held + cost > MATERIALISED_BUDGET)
            ):
                finish_oldest()
            if ref.span is not None:
                future = pool.submit(_copy_and_hash, ref.span, out.fd, offset)
            elif ref.cast_from is not None:
                future = pool.submit(_cast_and_hash, ref.cast_from, ref.dtype, out.fd, offset)
            else:
                future = pool.submit(_materialise_and_hash, ref, out.fd, offset)
            in_flight.append((future, out, ref.nbytes, cost))
            held += cost
        while in_flight:
            finish_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for out in opened:
            out.abandon()
    return [out.digest for out in opened]


def _interleaved(
    files: Sequence[tuple[str, Items]], metadata: dict[str, str], opened: list, sync: bool
) -> Iterator[tuple[_OutFile, TensorRef, int]]:
    """Every file's jobs, taken in turn from up to ``WORKERS`` open files.

    Workers that write to different files do not queue on one inode's write lock (measured:
    up to a tenth of the CPU time spinning on it). Each file's own jobs stay in data order.
    Files are created as they come into turn and appended to ``opened``.
    """
    pending = iter(files)
    turns: deque[tuple[_OutFile, Iterator[tuple[TensorRef, int]]]] = deque()
    while True:
        while len(turns) < WORKERS:
            nxt = next(pending, None)
            if nxt is None:
                break
            out = _OutFile.create(nxt[0], nxt[1], metadata)
            opened.append(out)
            if out.complete:  # no tensors: the header is the whole file
                out.close(sync)
            else:
                turns.append((out, iter(out.jobs)))
        if not turns:
            return
        out, jobs = turns.popleft()
        job = next(jobs, None)
        if job is not None:
            yield out, *job
            turns.append((out, jobs))


def _copied_spans(files: Sequence[tuple[str, Items]]) -> list[SpanKey]:
    """The keys of every span the write will copy (for :meth:`SourceDigests.keep_only`)."""
    spans = (ref.span for _, items in files for _, ref in items if ref.span is not None)
    return [key for key in map(_span_key, spans) if key is not None]


def _span_key(span: ByteSpan) -> SpanKey | None:
    """``span``'s key among prehashed digests; None if its file's identity is unknown."""
    return None if span.file is None else (span.file, span.offset, span.length)


def _streamable(ref: TensorRef) -> bool:
    """Whether ``ref`` is written piece by piece (no memory beyond the workers' buffers)."""
    return ref.span is not None or ref.cast_from is not None


@dataclass
class _OutFile:
    """One output file being written: its layout, descriptor and the digests so far."""

    path: str
    fd: int
    header: bytes
    entries: list[tuple[str, dict[str, Any]]]
    jobs: list[tuple[TensorRef, int]]  # each tensor and its absolute offset, in data order
    digests: list[bytes] = field(default_factory=list)
    digest: str = ""

    @classmethod
    def create(cls, path: str, items: Items, metadata: dict[str, str]) -> _OutFile:
        ordered = layout(items)
        metadata = {
            **{k: v for k, v in metadata.items() if k not in (DIGEST_KEY, TENSOR_DIGESTS_KEY)},
            DIGEST_KEY: "0" * 64,
            TENSOR_DIGESTS_KEY: "0" * (64 * len(ordered)),
        }
        header, entries = encode_header(ordered, metadata)
        header = pad_header(header, _aligning_spaces(len(header), ordered, entries))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            # Full size first: jobs finish out of order, and empty tensors at the end write
            # nothing.
            os.ftruncate(fd, len(header) + sum(ref.nbytes for _, ref in ordered))
            _pwrite_all(fd, header, 0)
        except BaseException:
            os.close(fd)
            raise
        jobs = [
            (ref, len(header) + entry["data_offsets"][0])
            for (_, ref), (_, entry) in zip(ordered, entries, strict=True)
        ]
        return cls(path, fd, header, entries, jobs)

    @property
    def complete(self) -> bool:
        return len(self.digests) == len(self.jobs)

    def close(self, sync: bool) -> None:
        """Patch the digests into the header, fsync if asked, and close."""
        self.digest = content_digest(self.entries, self.digests)
        self._patch(DIGEST_KEY, self.digest)
        self._patch(TENSOR_DIGESTS_KEY, "".join(d.hex() for d in self.digests))
        if sync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abandon(self) -> None:
        """Close the descriptor if an error left the file unfinished."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _patch(self, key: str, value: str) -> None:
        """Overwrite the zero placeholder of metadata ``key`` with ``value`` (same length)."""
        needle = json.dumps({key: "0" * len(value)}, separators=(",", ":"))[1:-1].encode()
        at = self.header.index(needle) + len(needle) - len(value) - 1
        _pwrite_all(self.fd, value.encode("ascii"), at)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # never seen on a regular file; better an error than a loop
            raise OSError(errno.EIO, "write made no progress")
        view, offset = view[n:], offset + n


def _aligning_spaces(data_start: int, ordered: Items, entries: list) -> int:
    """How many spaces to add to a header ending at ``data_start`` so that the most bytes
    copied from source files sit at the same offset modulo the page size as in their source
    (a multiple of 8, keeping every tensor as aligned as the reference writer does)."""
    copied: Counter[int] = Counter()
    for (_, ref), (_, entry) in zip(ordered, entries, strict=True):
        if ref.span is not None:
            spaces = (ref.span.offset - data_start - entry["data_offsets"][0]) % mmap.PAGESIZE
            if spaces % 8 == 0:
                copied[spaces] += ref.span.length
    return max(copied, key=copied.__getitem__) if copied else 0


def _copy_and_hash(span: ByteSpan, fd: int, offset: int) -> bytes:
    """Copy ``span`` to ``offset`` in ``fd``; the sha256 of the bytes copied (hashed here
    unless a running hasher already holds it for this very file)."""
    with open_span(span) as src:  # checks the file is the one planned, before and after
        key = _span_key(span)
        known = prehash.claim(key) if key is not None else None
        if known is not None:
            if not _kernel_copy(src, span, fd, offset):
                _copy_parts(src, span, fd, offset, None)
            return known
        h = hashlib.sha256()
        _copy_parts(src, span, fd, offset, h)
        return h.digest()


def _kernel_copy(src: int, span: ByteSpan, fd: int, offset: int) -> bool:
    """Copy ``span`` to ``offset`` in ``fd`` with ``copy_file_range``; False if the kernel
    cannot copy between these two files (the caller copies some other way; which errors
    mean that follows coreutils' ``cp``)."""
    if not hasattr(os, "copy_file_range"):  # Linux only
        return False
    done = 0
    while done < span.length:
        try:
            n = os.copy_file_range(
                src, fd, min(KERNEL_COPY, span.length - done), span.offset + done, offset + done
            )
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            return False
        if n <= 0:
            if done == 0:  # some file systems copy nothing rather than refuse
                return False
            raise InputError(f"{span.path}: file ended early (truncated while reading?)")
        done += n
    return True


_NO_KERNEL_COPY = {
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EOPNOTSUPP,
    errno.EBADF,
    errno.EPERM,  # a seccomp filter, or an immutable file
    errno.ETXTBSY,
}


def _copy_parts(src: int, span: ByteSpan, fd: int, offset: int, h: Any | None) -> None:
    """Copy ``span`` to ``offset`` in ``fd`` a part at a time, feeding each part to ``h``."""
    buf = _buffers().source
    for at in range(0, span.length, PART):
        part = read_exactly(src, span, at, buf[: min(PART, span.length - at)])
        if h is not None:
            h.update(part)
        _pwrite_all(fd, part, offset + at)


def _cast_and_hash(source: CastSpan, dtype: torch.dtype, fd: int, offset: int) -> bytes:
    """Write ``source`` converted to ``dtype`` at ``offset`` in ``fd``, a piece at a time;
    the sha256 of the bytes written."""
    span, in_size, out_size = source.span, source.dtype.itemsize, dtype.itemsize
    per_part = PART // max(in_size, out_size)  # elements converted at a time
    total = span.length // in_size
    buffers = _buffers()
    h = hashlib.sha256()
    with open_span(span) as src:
        for first in range(0, total, per_part):
            count = min(per_part, total - first)
            raw = read_exactly(src, span, first * in_size, buffers.source[: count * in_size])
            converted = buffers.converted[: count * out_size]
            converted.view(dtype).copy_(torch.frombuffer(raw, dtype=source.dtype))
            part = memoryview(converted.numpy())
            h.update(part)
            _pwrite_all(fd, part, offset + first * out_size)
    return h.digest()


@dataclass
class _Buffers:
    """One worker's buffers, allocated once: fresh memory faulted in for every part would
    cost more than the copy itself on a virtual machine (measured here)."""

    source: memoryview = field(default_factory=lambda: memoryview(bytearray(PART)))
    converted: torch.Tensor = field(default_factory=lambda: torch.empty(PART, dtype=torch.uint8))


_local = threading.local()


def _buffers() -> _Buffers:
    """This thread's buffers."""
    if not hasattr(_local, "buffers"):
        _local.buffers = _Buffers()
    return _local.buffers


def _materialise_and_hash(ref: TensorRef, fd: int, offset: int) -> bytes:
    """Compute ``ref``, write its bytes at ``offset`` in ``fd``; their sha256."""
    data = tensor_bytes(ref.load())
    _pwrite_all(fd, data, offset)
    return hashlib.sha256(data).digest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The row-major bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
