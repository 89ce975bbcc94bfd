"""safetensors, read and written without the library's all-in-memory calls.

The reader validates a header as strictly as the reference Rust reader (and catches the
duplicate keys its JSON parser lets through), then serves each tensor lazily with one
positioned read. Headers are encoded here too; the streaming writer that uses them is
:mod:`ckptsurgeon.formats.safetensors_writer`.

Every file ckptsurgeon writes records its own sha256 digests in ``__metadata__`` (see
:func:`content_digest`), so ``inspect --verify`` can later prove it intact or name the
tensor whose bytes changed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptsurgeon.errors import InputError, UsageError
from ckptsurgeon.formats.safetensors_header import (  # noqa: F401 (re-exported)
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    TORCH_DTYPE_NAMES,
    Header,
    read_header,
)
from ckptsurgeon.formats.spans import ByteSpan, read_span
from ckptsurgeon.formats.table import Table, TensorRef

# Integrity records (metadata values are strings): the file's content digest, and the
# per-tensor sha256 digests concatenated in data order (64 hex characters per tensor).
DIGEST_KEY = "ckptsurgeon.sha256"
TENSOR_DIGESTS_KEY = "ckptsurgeon.tensor_sha256"
_DIGEST_DOMAIN = b"ckptsurgeon.sha256/v1\n"
CHUNK = 16 << 20


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name; InputError if torch has none."""
    name = TORCH_DTYPE_NAMES.get(st_dtype)
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype {st_dtype} is valid safetensors but this torch cannot hold it")
    return dtype


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype name for a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for key, value in TORCH_DTYPE_NAMES.items():
        if value == name:
            return key
    raise UsageError(f"dtype {name} cannot be stored in safetensors; write a .pt output")


def span_loader(span: ByteSpan, shape: tuple[int, ...], dtype: torch.dtype):
    """A loader for a tensor whose row-major bytes are ``span`` (safetensors, plain GGUF)."""

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
        span = ByteSpan(path, header.data_start + begin, end - begin, header.file)
        table[name] = TensorRef(shape, dtype, span_loader(span, shape, dtype), span, (name,))
    return table


def layout(items: Sequence[tuple[str, TensorRef]]) -> list[tuple[str, TensorRef]]:
    """The reference writer's data order: widest dtype first (keeps every tensor aligned for
    zero-copy mmap readers), then by name, so the same table always gives the same bytes."""
    return sorted(items, key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))


def encode_header(
    ordered: Sequence[tuple[str, TensorRef]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[str, dict[str, Any]]]]:
    """The encoded header (length prefix included, padded to 8 bytes) for tensors stored in
    ``ordered`` order, and its tensor entries in that order."""
    entries = []
    offset = 0
    for name, ref in ordered:
        entry = {
            "dtype": st_dtype(ref.dtype),
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + ref.nbytes],
        }
        entries.append((name, entry))
        offset += ref.nbytes
    header: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, entries


def pad_header(header: bytes, spaces: int) -> bytes:
    """``header`` (as :func:`encode_header` returns it) with ``spaces`` more trailing spaces,
    which the format allows: moves the start of the data that many bytes on."""
    if not spaces:
        return header
    return struct.pack("<Q", len(header) - 8 + spaces) + header[8:] + b" " * spaces


def build_header(items: Sequence[tuple[str, TensorRef]], metadata: dict[str, str]) -> bytes:
    """The encoded header for ``items`` written in the reference writer's order."""
    return encode_header(layout(items), metadata)[0]


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
