"""safetensors, read and written without the library's all-in-memory calls.

The reader validates a header as strictly as the reference Rust reader (and catches the
duplicate keys its JSON parser lets through), then serves each tensor lazily with one
positioned read. The writer streams: header first, then tensor after tensor, copying
unchanged bytes file-to-file so memory stays flat whatever the checkpoint's size.

Every file the writer makes records its own sha256 digests in ``__metadata__`` (see
:func:`content_digest`), so ``inspect --verify`` can later prove it intact or name the
tensor whose bytes changed. The header is written first with zero-filled placeholders of
the digests' exact length and patched in place once the data is out: one pass, flat memory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.table import ByteSpan, Table, TensorRef

MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
# Integrity records (metadata values are strings): the file's content digest, and the
# per-tensor sha256 digests concatenated in data order (64 hex characters per tensor).
DIGEST_KEY = "ckptsurgeon.sha256"
TENSOR_DIGESTS_KEY = "ckptsurgeon.tensor_sha256"
_DIGEST_DOMAIN = b"ckptsurgeon.sha256/v1\n"
CHUNK = 16 << 20

# safetensors dtype name -> bits per element (the reference reader's table).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I16": "int16",
    "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
}  # fmt: skip


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name; InputError if torch has none."""
    name = _TORCH_DTYPES.get(st_dtype)
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype {st_dtype} is valid safetensors but this torch cannot hold it")
    return dtype


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype name for a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for key, value in _TORCH_DTYPES.items():
        if value == name:
            return key
    raise InputError(f"dtype {name} cannot be stored in safetensors")


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    data_start: int  # absolute offset of the byte buffer


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InputError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str) -> Header:
    """Parse and validate the header of the safetensors file at ``path``.

    Raises InputError naming the file and the first rule the header breaks.
    """
    try:
        return _read_header(path)
    except InputError as exc:
        raise InputError(f"{path}: not a valid safetensors file: {exc}") from None


def _read_header(path: str) -> Header:
    file_size = os.path.getsize(path)
    if file_size < 8:
        raise InputError(f"{file_size} bytes, too short for the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise InputError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
        if 8 + n > file_size:
            raise InputError(f"header length {n} runs past the end of the file ({file_size} bytes)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("header is not UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise InputError(f"header is not JSON ({exc.msg} at char {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # absurd nesting or numbers
        raise InputError(f"header is not acceptable JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise InputError("header is not a JSON object")

    metadata = obj.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError("__metadata__ must map strings to strings")

    spans = []
    for name, info in obj.items():
        _check_entry(name, info)
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            kind = "gap" if begin > expected else "overlap"
            raise InputError(f"tensor {name!r}: data offsets leave a {kind} at byte {expected}")
        expected = end
    if 8 + n + expected != file_size:
        raise InputError(
            f"data covers {expected} bytes but the file holds {file_size - 8 - n} after the header"
        )
    return Header(tensors=obj, metadata=metadata, data_start=8 + n)


def _check_entry(name: str, info: Any) -> None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise InputError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise InputError(
            f"tensor {name!r}: shape {shape} x {dtype} is {bits / 8:g} bytes "
            f"but data_offsets cover {offsets[1] - offsets[0]}"
        )


def read_span(span: ByteSpan) -> bytearray:
    """Read exactly the bytes of ``span`` into a fresh writable buffer."""
    buf = bytearray(span.length)
    view = memoryview(buf)
    with open(span.path, "rb", buffering=0) as f:
        f.seek(span.offset)
        done = 0
        while done < span.length:
            got = f.readinto(view[done:])
            if not got:
                raise InputError(f"{span.path}: file ended early (truncated while reading?)")
            done += got
    return buf


def _span_loader(span: ByteSpan, shape: tuple[int, ...], dtype: torch.dtype):
    def load() -> torch.Tensor:
        if span.length == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(read_span(span), dtype=dtype).reshape(shape)

    return load


def open_safetensors(path: str, header: Header | None = None) -> Table:
    """A lazy table over one safetensors file, in the file's key order."""
    header = header or read_header(path)
    table: Table = {}
    for name, info in header.tensors.items():
        begin, end = info["data_offsets"]
        try:
            dtype = torch_dtype(info["dtype"])
        except InputError as exc:
            raise InputError(f"{path}: tensor {name!r}: {exc}") from None
        shape = tuple(info["shape"])
        span = ByteSpan(path, header.data_start + begin, end - begin)
        table[name] = TensorRef(shape, dtype, _span_loader(span, shape, dtype), span, (name,))
    return table


def _layout(items: list[tuple[str, TensorRef]]) -> list[tuple[str, TensorRef]]:
    # The reference writer's order: widest dtype first (keeps every tensor aligned for
    # zero-copy mmap readers), then by name, so the same table always gives the same bytes.
    return sorted(items, key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))


def _entries(items: list[tuple[str, TensorRef]]) -> list[tuple[str, dict[str, Any]]]:
    """Header entries for tensors written in ``items`` order."""
    entries = []
    offset = 0
    for name, ref in items:
        entries.append(
            (
                name,
                {
                    "dtype": st_dtype(ref.dtype),
                    "shape": list(ref.shape),
                    "data_offsets": [offset, offset + ref.nbytes],
                },
            )
        )
        offset += ref.nbytes
    return entries


def _encode_header(entries: list[tuple[str, dict[str, Any]]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def build_header(items: list[tuple[str, TensorRef]], metadata: dict[str, str]) -> bytes:
    """The encoded header (length prefix included) for tensors written in ``items`` order."""
    return _encode_header(_entries(items), metadata)


def content_digest(entries: list[tuple[str, dict[str, Any]]], tensor_digests: list[bytes]) -> str:
    """The file digest recorded under ``ckptsurgeon.sha256``.

    sha256 over a version tag, every tensor's name, dtype, shape and offsets (``entries``, in
    data order, as compact JSON) and each tensor's own sha256 (raw, in the same order). It
    therefore covers every byte a loader interprets, while metadata and padding may change
    without making it stale; each byte of data is hashed once.
    """
    h = hashlib.sha256(_DIGEST_DOMAIN)
    table = [[name, e["dtype"], e["shape"], e["data_offsets"]] for name, e in entries]
    h.update(json.dumps(table, separators=(",", ":")).encode("utf-8"))
    h.update(b"\n")
    for digest in tensor_digests:
        h.update(digest)
    return h.hexdigest()


# copy_file_range errors that mean "not here, copy in user space instead"; any other error
# (ENOSPC, EIO, ...) is a real write failure and propagates.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF,
                   errno.EPERM, errno.ETXTBSY}  # fmt: skip


def copy_span(span: ByteSpan, out) -> None:
    """Append the bytes of ``span`` to the open binary file ``out``, kernel-side when possible."""
    out.flush()
    with open(span.path, "rb", buffering=0) as src:
        offset, left = span.offset, span.length
        dst_fd = out.fileno()
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dst_fd, min(left, 1 << 30), offset)
                if n == 0:
                    raise InputError(f"{span.path}: file ended early (truncated while reading?)")
                offset += n
                left -= n
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            # Some filesystems refuse copy_file_range; fall back to a user-space copy of
            # whatever is still left.
            src.seek(offset)
            while left:
                chunk = src.read(min(left, 16 << 20))
                if not chunk:
                    raise InputError(f"{span.path}: file ended early") from None
                out.write(chunk)
                left -= len(chunk)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The row-major bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class _Digests:
    """sha256 of each tensor as it is written, computed on helper threads so hashing
    overlaps the copy (hashlib releases the GIL). Bytes copied file-to-file are hashed by
    reading them back from the output, so the digest is of what was written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        workers = max(1, min(2, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ckptsurgeon-sha256")
        self._futures: list[Future[bytes]] = []
        self._local = threading.local()

    def buffer(self, data: memoryview) -> Future[bytes]:
        future = self._pool.submit(lambda: hashlib.sha256(data).digest())
        self._futures.append(future)
        return future

    def written(self, offset: int, length: int) -> None:
        self._futures.append(self._pool.submit(self._read_back, offset, length))

    def _read_back(self, offset: int, length: int) -> bytes:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(min(CHUNK, max(length, 1)))
        elif len(buf) < min(CHUNK, length):
            buf = self._local.buf = bytearray(min(CHUNK, length))
        h = hashlib.sha256()
        view = memoryview(buf)
        end = offset + length
        while offset < end:
            got = os.preadv(self._fd, [view[: min(len(buf), end - offset)]], offset)
            if got <= 0:
                raise OSError(errno.EIO, "short read verifying the bytes just written")
            h.update(view[:got])
            offset += got
        return h.digest()

    def results(self) -> list[bytes]:
        return [f.result() for f in self._futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _patch(out, header: bytes, key: str, value: str) -> None:
    """Overwrite the zero placeholder of metadata ``key`` with ``value`` (same length)."""
    needle = json.dumps({key: "0" * len(value)}, separators=(",", ":"))[1:-1].encode()
    at = header.index(needle) + len(needle) - len(value) - 1
    out.seek(at)
    out.write(value.encode("ascii"))


def write_safetensors(
    path: str,
    items: Iterable[tuple[str, TensorRef]],
    metadata: dict[str, str],
    on_bytes=None,
    *,
    sync: bool = True,
) -> str:
    """Stream ``items`` into a new safetensors file at ``path`` (header, then data).

    Tensors whose bytes sit unchanged in another file are copied file-to-file; the rest are
    materialised one at a time, so peak memory is one tensor, not the checkpoint.
    ``on_bytes(n)`` is called after each tensor (progress reporting). Returns the file's
    content digest, also recorded in its metadata with every tensor's digest.
    """
    ordered = _layout(list(items))
    entries = _entries(ordered)
    metadata = {
        **{k: v for k, v in metadata.items() if k not in (DIGEST_KEY, TENSOR_DIGESTS_KEY)},
        DIGEST_KEY: "0" * 64,
        TENSOR_DIGESTS_KEY: "0" * (64 * len(ordered)),
    }
    header = _encode_header(entries, metadata)
    with open(path, "w+b") as out:
        digests = _Digests(out.fileno())
        try:
            out.write(header)
            for (_name, ref), (_, entry) in zip(ordered, entries, strict=True):
                if ref.span is not None and ref.span.length == ref.nbytes:
                    copy_span(ref.span, out)
                    out.flush()
                    digests.written(len(header) + entry["data_offsets"][0], ref.nbytes)
                else:
                    data = tensor_bytes(ref.load())
                    hashed = digests.buffer(data)
                    out.write(data)
                    hashed.result()  # one tensor in memory at a time
                    del data
                if on_bytes:
                    on_bytes(ref.nbytes)
            out.flush()
            tensor_digests = digests.results()
        finally:
            digests.close()
        digest = content_digest(entries, tensor_digests)
        _patch(out, header, DIGEST_KEY, digest)
        _patch(out, header, TENSOR_DIGESTS_KEY, "".join(d.hex() for d in tensor_digests))
        out.flush()
        if sync:
            os.fsync(out.fileno())
    return digest


@dataclass(frozen=True)
class Verdict:
    """What ``verify_safetensors`` found: ``ok``, ``corrupt`` or ``unrecorded``."""

    path: str
    status: str
    detail: str = ""
    digest: str | None = None  # the recomputed content digest


def _data_order(header: Header) -> list[tuple[str, dict[str, Any]]]:
    return sorted(header.tensors.items(), key=lambda kv: kv[1]["data_offsets"][0])


def _hash_tensors(path: str, header: Header, entries) -> list[bytes]:
    """sha256 of each tensor's bytes, in one sequential pass over the data section."""
    out: list[bytes] = []
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(header.data_start)
        for _name, entry in entries:
            begin, end = entry["data_offsets"]
            h = hashlib.sha256()
            left = end - begin
            while left:
                got = f.readinto(view[: min(CHUNK, left)])
                if not got:
                    raise InputError(f"{path}: file ended early (truncated while verifying?)")
                h.update(view[:got])
                left -= got
            out.append(h.digest())
    return out


def verify_safetensors(path: str, expected: str | None = None) -> Verdict:
    """Recompute a file's digests and compare them with its records (and ``expected``,
    the digest a shard index recorded for it, when given)."""
    header = read_header(path)
    recorded = header.metadata.get(DIGEST_KEY)
    if recorded is None and expected is None:
        return Verdict(path, "unrecorded", "no recorded sha256 (not written by ckptsurgeon?)")
    entries = _data_order(header)
    actual = _hash_tensors(path, header, entries)
    digest = content_digest(entries, actual)
    problems = []
    if recorded is not None and digest != recorded:
        problems.append("does not match the sha256 in its header")
    if expected is not None and digest != expected:
        problems.append("does not match the sha256 the index records for it")
    if not problems:
        return Verdict(path, "ok", digest=digest)
    listed = header.metadata.get(TENSOR_DIGESTS_KEY, "")
    bad = []
    if len(listed) == 64 * len(entries):
        for i, (name, entry) in enumerate(entries):
            if listed[64 * i : 64 * i + 64] != actual[i].hex():
                begin, end = (header.data_start + o for o in entry["data_offsets"])
                bad.append(f"tensor {name!r} (bytes {begin}..{end})")
    where = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    detail = " and ".join(problems) + (
        f": corrupt data in {where}" if bad else ": the header or its records were changed"
    )
    return Verdict(path, "corrupt", detail, digest)
