"""Where a tensor's bytes lie in a source file, and reading them back safely.

A plan is made from headers read once, then data is read much later, by other threads and
other calls. So a span remembers the identity of the file it was read from, and every read
checks that identity before and after: a source replaced or rewritten in the meantime is an
:class:`~ckptsurgeon.errors.InputError`, never bytes of some other layout written as if they
were the tensor (their digests would match, so nothing later would notice).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.safetensors_header import FileId, file_id


@dataclass(frozen=True)
class ByteSpan:
    """Where a tensor's raw row-major bytes lie in a file (absolute offset). ``file`` is the
    file's identity when its layout was read (None: not checked)."""

    path: str
    offset: int
    length: int
    file: FileId | None = None

    def sub(self, offset: int, length: int) -> ByteSpan:
        """The ``length`` bytes at ``offset`` within this span."""
        return replace(self, offset=self.offset + offset, length=length)


@dataclass(frozen=True)
class CastSpan:
    """A tensor stored as the bytes of ``span`` read as ``dtype``, to be converted element
    by element: lets writers stream a cast in small pieces instead of materialising it."""

    span: ByteSpan
    dtype: torch.dtype


@contextlib.contextmanager
def open_span(span: ByteSpan) -> Iterator[int]:
    """A read-only descriptor on the file ``span`` lies in.

    Raises InputError if the file cannot be opened, or if it is not the file the span was
    read from, on opening or once the caller is done with it (replaced or written since).
    """
    try:
        fd = os.open(span.path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"{span.path}: cannot read: {exc.strerror}") from None
    try:
        _check_unchanged(span, fd)
        yield fd
        _check_unchanged(span, fd)
    finally:
        os.close(fd)


def _check_unchanged(span: ByteSpan, fd: int) -> None:
    if span.file is not None and file_id(os.fstat(fd)) != span.file:
        raise InputError(
            f"{span.path}: changed since it was read (replaced or written to); "
            "run again once nothing is writing to it"
        )


def read_exactly(fd: int, span: ByteSpan, at: int, into: memoryview) -> memoryview:
    """Fill ``into`` with the bytes of ``span`` from ``at`` on; InputError if the file ends
    or cannot be read."""
    done = 0
    while done < len(into):
        try:
            n = os.preadv(fd, [into[done:]], span.offset + at + done)
        except OSError as exc:
            raise InputError(f"{span.path}: cannot read: {exc.strerror}") from None
        if n <= 0:
            raise InputError(f"{span.path}: file ended early (truncated while reading?)")
        done += n
    return into


def read_span(span: ByteSpan) -> bytearray:
    """Read exactly the bytes of ``span`` into a fresh writable buffer."""
    buf = bytearray(span.length)
    with open_span(span) as fd:
        read_exactly(fd, span, 0, memoryview(buf))
    return buf
