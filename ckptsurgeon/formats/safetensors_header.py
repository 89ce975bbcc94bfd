"""safetensors headers, read and validated without torch (the CLI reads them before
importing it; see :mod:`ckptsurgeon.formats.prehash`).

The validation is as strict as the reference Rust reader's, and also catches the duplicate
keys its JSON parser lets through.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from ckptsurgeon.errors import InputError

MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

# safetensors dtype name -> bits per element (the reference reader's table).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

# safetensors dtype name -> torch's name for that dtype (torch has no 4- or 6-bit floats).
TORCH_DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I16": "int16",
    "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
}  # fmt: skip


FileId = tuple[int, int, int, int]  # device, inode, size, mtime_ns


def file_id(stat: os.stat_result) -> FileId:
    """A file's identity for telling whether it changed. Not the ctime: chmod, a new hard
    link or a backup tool's xattr move it without touching a byte."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    data_start: int  # absolute offset of the byte buffer
    file: FileId  # the file's identity when the header was read


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
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        file_size = stat.st_size
        if file_size < 8:
            raise InputError(f"{file_size} bytes, too short for the 8-byte header length")
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
    return Header(tensors=obj, metadata=metadata, data_start=8 + n, file=file_id(stat))


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
