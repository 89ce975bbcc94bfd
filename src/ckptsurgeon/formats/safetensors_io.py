"""safetensors, read and written without the library's all-in-memory calls.

The reader validates a header as strictly as the reference Rust reader (and catches the
duplicate keys its JSON parser lets through), then serves each tensor lazily with one
positioned read. The writer streams: header first, then tensor after tensor, copying
unchanged bytes file-to-file so memory stays flat whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.table import ByteSpan, Table, TensorRef

MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

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


def build_header(items: list[tuple[str, TensorRef]], metadata: dict[str, str]) -> bytes:
    """The encoded header (length prefix included) for tensors written in ``items`` order."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for name, ref in items:
        header[name] = {
            "dtype": st_dtype(ref.dtype),
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + ref.nbytes],
        }
        offset += ref.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


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
        except OSError:
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


def write_safetensors(
    path: str,
    items: Iterable[tuple[str, TensorRef]],
    metadata: dict[str, str],
    on_bytes=None,
) -> None:
    """Stream ``items`` into a new safetensors file at ``path`` (header, then data).

    Tensors whose bytes sit unchanged in another file are copied file-to-file; the rest are
    materialised one at a time, so peak memory is one tensor, not the checkpoint.
    ``on_bytes(n)`` is called after each tensor (progress reporting).
    """
    ordered = _layout(list(items))
    with open(path, "wb") as out:
        out.write(build_header(ordered, metadata))
        for _name, ref in ordered:
            if ref.span is not None and ref.span.length == ref.nbytes:
                copy_span(ref.span, out)
            else:
                out.write(tensor_bytes(ref.load()))
            if on_bytes:
                on_bytes(ref.nbytes)
        out.flush()
        os.fsync(out.fileno())
