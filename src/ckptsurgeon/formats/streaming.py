"""The streaming safetensors writer: many files, one pool of workers, bounded memory.

Each output file is laid out before any data is written (its header, with zero-filled
placeholders for the digests, and every tensor's offset), so its tensors become independent
jobs that worker threads run in any order:

* a tensor whose bytes sit unchanged in a source file is hashed and copied chunk by chunk,
  the kernel doing the copy (``copy_file_range``) while the chunk is still in the CPU cache
  from hashing it;
* any other tensor is materialised, hashed and written at its offset with ``pwrite``.

The calling thread submits jobs in data order across all files, keeps a few in flight and
at most ``MATERIALISED_BUDGET`` bytes of materialised tensors (one tensor always goes, however
large), takes the digests back in order, and closes each file (digests patched into its
header, fsync) as soon as its last job is done while the workers go on with the next file.
sha256, the copies and torch's kernels release the GIL, so the workers really run in parallel:
hashing costs more CPU than copying here, and this is what keeps a rename near ``cp`` speed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.safetensors_io import (
    DIGEST_KEY,
    TENSOR_DIGESTS_KEY,
    content_digest,
    encode_header,
    layout,
)
from ckptsurgeon.formats.table import ByteSpan, TensorRef

CHUNK = 8 << 20  # bytes hashed then copied at a time: fits the cache, few system calls
MATERIALISED_BUDGET = 64 << 20
WORKERS = max(1, min(8, os.cpu_count() or 1))

Items = Sequence[tuple[str, TensorRef]]

# copy_file_range errors that mean "not here, copy in user space instead"; any other error
# (ENOSPC, EIO, ...) is a real write failure and propagates.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF,
                   errno.EPERM, errno.ETXTBSY}  # fmt: skip


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
    closed. Returns the files' content digests, in order. On any error the jobs still
    queued are cancelled and the error propagates; the caller removes the partial files.
    """
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
        for path, items in files:
            out = _OutFile.create(path, items, metadata)
            opened.append(out)
            if out.complete:  # no tensors: the header is the whole file
                out.close(sync)
            for ref, offset in out.jobs:
                copyable = _copyable(ref)
                cost = 0 if copyable else ref.nbytes
                while in_flight and (
                    len(in_flight) >= 2 * WORKERS
                    or (cost and held and held + cost > MATERIALISED_BUDGET)
                ):
                    finish_oldest()
                if copyable:
                    future = pool.submit(_copy_and_hash, ref.span, out.fd, offset)
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


def _copyable(ref: TensorRef) -> bool:
    return ref.span is not None and ref.span.length == ref.nbytes


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
        view, offset = view[n:], offset + n


def _copy_and_hash(span: ByteSpan, fd: int, offset: int) -> bytes:
    """Copy ``span`` to ``offset`` in ``fd``; the sha256 of the bytes copied."""
    h = hashlib.sha256()
    kernel = True
    with open(span.path, "rb", buffering=0) as src:
        for at in range(0, span.length, CHUNK):
            n = min(CHUNK, span.length - at)
            with _mapped(src, span.offset + at, n) as chunk:
                h.update(chunk)
                if kernel:
                    kernel = _kernel_copy(src, fd, span.offset + at, offset + at, n)
                if not kernel:
                    _pwrite_all(fd, chunk, offset + at)
    return h.digest()


@contextlib.contextmanager
def _mapped(src, offset: int, length: int) -> Iterator[memoryview]:
    """``length`` bytes of ``src`` at ``offset``, mapped read-only and unmapped after (so the
    pages touched never pile up in this process's memory)."""
    if os.fstat(src.fileno()).st_size < offset + length:
        raise InputError(f"{src.name}: file ended early (truncated while reading?)")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(
        src.fileno(), offset + length - start, offset=start, access=mmap.ACCESS_READ
    )
    with memoryview(mapping) as whole, whole[offset - start :] as view:
        yield view
    # Not in a ``finally``: after an error, the traceback's frames still hold slices of the
    # mapping, which is unmapped when they are freed.
    mapping.close()


def _kernel_copy(src, dst_fd: int, src_offset: int, dst_offset: int, n: int) -> bool:
    """Copy inside the kernel; False if this filesystem pair refuses (copy in user space)."""
    try:
        while n:
            done = os.copy_file_range(src.fileno(), dst_fd, n, src_offset, dst_offset)
            if done == 0:
                raise InputError(f"{src.name}: file ended early (truncated while reading?)")
            src_offset, dst_offset, n = src_offset + done, dst_offset + done, n - done
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            raise
        return False
    return True


def _materialise_and_hash(ref: TensorRef, fd: int, offset: int) -> bytes:
    """Compute ``ref``, write its bytes at ``offset`` in ``fd``; their sha256."""
    data = tensor_bytes(ref.load())
    _pwrite_all(fd, data, offset)
    return hashlib.sha256(data).digest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The row-major bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
