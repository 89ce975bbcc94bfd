"""sha256 of a safetensors source's tensors, computed while the CLI is still starting up.

Every output records each tensor's sha256, and for tensors copied unchanged that is the
digest of source bytes. Hashing costs more CPU than copying (sha256 runs at about 1.4 GB/s
per core here, a page-cache copy at about 3 GB/s), yet the CLI spends its first seconds
importing torch on one core while the other sits idle. So ``apply`` and ``convert`` start
a :class:`SourceDigests` before that import: a background thread (torch-free, like this
module) hashes the source's tensors in file order, and the writer takes each digest when it
copies that tensor, or hashes the tensor itself if the thread has not got to it.

A digest is only ever used for the very file it was computed from: each is keyed by the
file's identity (device, inode, size and mtime: see
:func:`~ckptsurgeon.formats.safetensors_header.file_id`) as well as the byte range, the
writer looks it up with the identity its span was planned with, and checks that identity
on the open file before and after copying.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.safetensors_header import FileId, file_id, read_header

# Bytes read and hashed per call. Large, because the thread needs the GIL between calls
# and the import it runs beside holds it most of the time: 1 MiB parts hashed ~200 MB/s.
PIECE = 16 << 20
SpanKey = tuple[FileId, int, int]  # the file, offset, length


def safetensors_files(source: str) -> list[str]:
    """The safetensors files a source path stands for: itself, or a folder's shards."""
    if os.path.isfile(source):
        return [source] if source.endswith(".safetensors") else []
    return sorted(glob.glob(os.path.join(glob.escape(source), "*.safetensors")))


class SourceDigests:
    """Digests of source tensors, hashed in the background; see the module docstring."""

    def __init__(self, files: Iterable[str]) -> None:
        files = list(files)
        self._files = {_identity(f) for f in files} - {None}
        self._lock = threading.Lock()
        self._digests: dict[SpanKey, Future[bytes | None]] = {}
        self._wanted: set[SpanKey] | None = None  # None: every span
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(files,), name="ckptsurgeon-prehash", daemon=True
        )
        self._thread.start()
        with _running_lock:
            _running.append(self)

    @classmethod
    def start(cls, source: str) -> SourceDigests | None:
        """Start hashing ``source`` if it is safetensors; None otherwise (nothing to gain)."""
        files = safetensors_files(source)
        if not files:
            return None
        return cls(files)

    def covers(self, key: SpanKey) -> bool:
        """Whether ``key`` lies in one of the files this hashes (as they were when started)."""
        return key[0] in self._files

    def keep_only(self, keys: Iterable[SpanKey]) -> None:
        """Hash no span but these from now on (the writer's plan is known)."""
        with self._lock:
            self._wanted = set(keys)

    def claim(self, key: SpanKey) -> bytes | None:
        """The digest of ``key``'s bytes, waiting if the thread is hashing them right now;
        None if it has not started on them (the caller hashes them, the thread never will)."""
        with self._lock:
            future = self._digests.get(key)
            if future is None:
                self._digests[key] = _DONE_ELSEWHERE
                return None
        return future.result()

    def wait(self) -> None:
        """Block until the thread has been through every file."""
        self._thread.join()

    def stop(self) -> None:
        """Stop hashing (after the span in hand) and wait for the thread; writes no longer
        find it."""
        self._stop.set()
        self._thread.join()
        with _running_lock:
            if self in _running:
                _running.remove(self)

    def _run(self, files: list[str]) -> None:
        buf = memoryview(bytearray(PIECE))
        for path in files:
            try:
                header = read_header(path)
                with open(path, "rb", buffering=0) as f:
                    if file_id(os.fstat(f.fileno())) != header.file:
                        continue  # replaced since its header was read: no key would match
                    for info in header.tensors.values():
                        begin, end = info["data_offsets"]
                        key = (header.file, header.data_start + begin, end - begin)
                        if not self._hash_span(f, key, buf):
                            return
            except (OSError, InputError):
                continue  # the reader reports bad files properly; here they are just skipped

    def _hash_span(self, f, key: SpanKey, buf: memoryview) -> bool:
        """Hash one span unless claimed or unwanted; False once asked to stop."""
        if self._stop.is_set():
            return False
        with self._lock:
            if key in self._digests or (self._wanted is not None and key not in self._wanted):
                return True
            future: Future[bytes | None] = Future()
            self._digests[key] = future
        h = hashlib.sha256()
        offset, end = key[1], key[1] + key[2]
        try:
            while offset < end:
                if self._stop.is_set():
                    future.set_result(None)  # the writer hashes it after all
                    return False
                n = os.preadv(f.fileno(), [buf[: min(PIECE, end - offset)]], offset)
                if n <= 0:
                    future.set_result(None)
                    return True
                h.update(buf[:n])
                offset += n
        except BaseException:
            future.set_result(None)
            raise
        future.set_result(h.digest())
        return True


def _identity(path: str) -> FileId | None:
    try:
        return file_id(os.stat(path))
    except OSError:
        return None


# Every SourceDigests from its start until stopped: the writer finds the one for a span by
# its file's identity, so no caller passes digests down to it.
_running: list[SourceDigests] = []
_running_lock = threading.Lock()


@contextmanager
def using(digests: SourceDigests | None) -> Iterator[None]:
    """Let writes inside the block find ``digests`` too, even once stopped."""
    added = False
    if digests is not None:
        with _running_lock:
            added = digests not in _running
            if added:
                _running.append(digests)
    try:
        yield
    finally:
        if added:
            with _running_lock:
                _running.remove(digests)


def keep_only(keys: Iterable[SpanKey]) -> None:
    """Tell every running hasher which of its spans the write will copy (none else)."""
    keys = list(keys)
    with _running_lock:
        running = list(_running)
    for digests in running:
        digests.keep_only(k for k in keys if digests.covers(k))


def claim(key: SpanKey) -> bytes | None:
    """The digest of ``key``'s bytes from the hasher of its file, or None (hash them)."""
    with _running_lock:
        owner = next((d for d in _running if d.covers(key)), None)
    return owner.claim(key) if owner is not None else None


_DONE_ELSEWHERE: Future[bytes | None] = Future()
_DONE_ELSEWHERE.set_result(None)
