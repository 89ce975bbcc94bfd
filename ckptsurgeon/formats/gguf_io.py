"""GGUF files (llama.cpp's format), read through its own ``gguf`` package and dequantized.

The header (metadata and the tensor directory) is parsed by ``gguf.GGUFReader``, which
memory-maps the file. Each tensor then becomes a lazy ref whose loader reads only that
tensor's bytes (one identity-checked positioned read, as for safetensors) and decodes them
with ``gguf.quants.dequantize``: a quantised block format (Q8_0, Q4_K, ...) becomes float32;
F32, F16, BF16, F64 and the integer types keep their own dtype, bytes unchanged, so writers
copy them straight from disk. GGUF lists dimensions fastest-varying first (``ne0`` is a
row's length); the refs carry them reversed, in torch order.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.checkpoint import GGUF_MAGIC, Checkpoint
from ckptsurgeon.formats.safetensors_header import file_id
from ckptsurgeon.formats.safetensors_io import span_loader
from ckptsurgeon.formats.spans import ByteSpan, read_span
from ckptsurgeon.formats.table import Table, TensorRef

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFReader, ReaderField, ReaderTensor

# GGUF types whose bytes are already a torch dtype's, row-major and little-endian.
_PLAIN = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}  # fmt: skip

# Metadata arrays longer than this (a tokenizer's vocabulary) are summarised, not listed.
_LIST_AT_MOST = 8

# What gguf's reader raises on a corrupt file: short arrays from a truncated memory map,
# counts or enum values out of range, duplicate names, undecodable strings.
_CORRUPT = (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError)


def open_gguf(path: str) -> Checkpoint:
    """A lazy table over a GGUF file, tensors named as the file names them
    (``blk.0.attn_q.weight``); ``metadata`` holds its key/value header (long arrays
    summarised), ``quantization`` the number of tensors stored in each GGUF type."""
    gguf = _import_gguf(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{path}: not a GGUF file (bad magic, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except _CORRUPT as exc:
        raise InputError(f"{path}: corrupt or truncated GGUF file ({_reason(exc)})") from None
    if reader.byte_order != "I":
        raise InputError(f"{path}: a big-endian GGUF file, which ckptsurgeon cannot read")
    ident = file_id(os.stat(path))
    table: Table = {}
    types: Counter[str] = Counter()
    for tensor in reader.tensors:
        table[tensor.name] = _tensor_ref(path, ident, tensor)
        types[tensor.tensor_type.name] += 1
    return Checkpoint(
        path,
        "gguf",
        table,
        metadata=_metadata(path, reader),
        files=[path],
        quantization=dict(types),
    )


def _import_gguf(path: str) -> Any:
    try:
        import gguf
    except ImportError:
        raise InputError(
            f'{path}: reading GGUF needs the gguf package: pip install "ckptsurgeon[gguf]"'
        ) from None
    return gguf


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _tensor_ref(path: str, ident: Any, tensor: ReaderTensor) -> TensorRef:
    name, qtype = tensor.name, tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    span = ByteSpan(path, int(tensor.data_offset), int(tensor.n_bytes), ident)
    if span.offset + span.length > ident[2]:  # the reader maps what is there, and no more
        raise InputError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    dtype = _PLAIN.get(qtype.name)
    if dtype is not None:
        return TensorRef(shape, dtype, span_loader(span, shape, dtype), span, (name,))
    if not _can_dequantize(qtype):
        raise InputError(
            f"{path}: tensor {name!r} is stored as {qtype.name}, which the installed gguf "
            f"package cannot dequantize"
        )
    return TensorRef(shape, torch.float32, _dequantizing_loader(span, qtype, shape), None, (name,))


@cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` decodes ``qtype``: tried on one block of zeros."""
    from gguf import GGML_QUANT_SIZES, dequantize

    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _dequantizing_loader(span: ByteSpan, qtype: GGMLQuantizationType, shape: tuple[int, ...]):
    def load() -> torch.Tensor:
        from gguf import GGML_QUANT_SIZES, dequantize

        if span.length == 0:
            return torch.empty(shape)
        # gguf's reader refused rows that are not whole blocks, so this reshape is exact.
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = (shape[-1] if shape else 1) // block_size * type_size
        blocks = np.frombuffer(read_span(span), dtype=np.uint8).reshape(-1, row_bytes)
        values = dequantize(blocks, qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)

    return load


def _metadata(path: str, reader: GGUFReader) -> dict[str, str]:
    """The key/value header as strings, without the reader's own ``GGUF.*`` entries."""
    out: dict[str, str] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = _field_text(field)
        except _CORRUPT as exc:
            raise InputError(f"{path}: corrupt GGUF metadata {key!r} ({_reason(exc)})") from None
    return out


def _field_text(field: ReaderField) -> str:
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        if len(field.data) > _LIST_AT_MOST:
            return f"[{len(field.data)} {field.types[-1].name.lower()} values]"
        return json.dumps(field.contents())
    value = field.contents()
    return value if isinstance(value, str) else json.dumps(value)
