"""An opened checkpoint, and what is found about one without torch: its format (from bytes
and layout), the file that holds it, and the container its flat names nest under.

:func:`~ckptsurgeon.formats.reader.open_checkpoint` opens every format as a
:class:`Checkpoint` of lazy tensor refs; ``inspect`` opens safetensors as one of header
entries (:func:`~ckptsurgeon.formats.header_table.open_header_checkpoint`), without
importing torch. Both find formats, files and containers with the functions here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ckptsurgeon.errors import InputError, UsageError
from ckptsurgeon.formats import hub, zero_folder
from ckptsurgeon.formats.index import find_index

# Suffixes that name torch pickles: the ones ckptsurgeon writes, and those it also reads.
TORCH_OUTPUT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
TORCH_SUFFIXES = (*TORCH_OUTPUT_SUFFIXES, ".tar", ".pkl")

# The first bytes of every GGUF file (llama.cpp).
GGUF_MAGIC = b"GGUF"

# The file that makes a folder a torch.distributed.checkpoint (DCP) checkpoint.
DCP_METADATA_FILE = ".metadata"

# Containers a state dict is found under, most specific first (timm, Lightning, mmengine,
# and hand-written training loops); EMA copies last, so "the" weights win by default.
CONTAINER_PREFERENCE = (
    "state_dict", "model", "module", "model_state_dict", "net", "network", "params",
    "state_dict_ema", "model_ema", "ema",
)  # fmt: skip

T = TypeVar("T")
C = TypeVar("C", bound="Checkpoint[Any] | None")


@dataclass
class Checkpoint(Generic[T]):
    """An opened checkpoint: the tensors plus what was learnt while opening it.

    ``tensors`` maps each name to a lazy :class:`~ckptsurgeon.formats.table.TensorRef`
    (:func:`~ckptsurgeon.formats.reader.open_checkpoint`), or to a
    :class:`~ckptsurgeon.formats.header_table.HeaderTensor` (safetensors read for
    ``inspect``, without torch); in checkpoint order either way.
    """

    path: str
    format: str
    tensors: dict[str, T]
    containers: list[str] = field(default_factory=list)
    container: str | None = None
    note: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # name -> name it shares storage with
    # GGUF: how many tensors the file stores in each of its types (Q4_K, F16, ...), all
    # dequantized on read; empty for every other format.
    quantization: dict[str, int] = field(default_factory=dict)


def is_dcp_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DCP_METADATA_FILE))


def detect_format(path: str) -> str:
    """One of safetensors, safetensors-sharded, torch-zip, torch-legacy, torch-sharded, dcp,
    gguf, deepspeed-zero1, deepspeed-zero2, deepspeed-zero3.

    ``hf://org/name[@revision]`` is the snapshot folder in the Hugging Face cache."""
    if hub.is_hf(path):
        snapshot = hub.resolve(path)
        with hub.named_as(snapshot):
            return detect_format(snapshot.folder)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if is_dcp_folder(path):
            return "dcp"
        if zero_folder.is_zero_folder(path):
            return zero_folder.zero_format(zero_folder.locate(path))
        index = find_index(path)
        if index:
            return detect_format(index)
        return detect_format(_single_weights_file(path))
    if path.endswith(".index.json"):
        return (
            "safetensors-sharded" if path.endswith(".safetensors.index.json") else "torch-sharded"
        )
    size = os.path.getsize(path)
    if size == 0:
        raise InputError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    looks_safetensors = (
        len(head) == 9 and head[8:9] == b"{" and (struct.unpack("<Q", head[:8])[0] <= size - 8)
    )
    if looks_safetensors or path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(".gguf"):  # without the magic: the GGUF reader says what is wrong
        return "gguf"
    if head[:1] == b"\x80" or path.endswith(TORCH_SUFFIXES):
        return "torch-legacy"
    raise InputError(
        f"{path}: unrecognised format (not safetensors, a torch file, GGUF, an index or DCP)"
    )


def _single_weights_file(folder: str) -> str:
    names = sorted(os.listdir(folder))
    for preferred in ("model.safetensors", "pytorch_model.bin"):
        if preferred in names:
            return os.path.join(folder, preferred)
    for suffixes in ((".safetensors",), TORCH_SUFFIXES):
        found = [n for n in names if n.endswith(suffixes) and not n.startswith(".")]
        if len(found) == 1:
            return os.path.join(folder, found[0])
        if len(found) > 1:
            raise InputError(f"{folder}: several weight files ({', '.join(found)}); name one")
    raise InputError(f"{folder}: no checkpoint found (no index, weights file or DCP metadata)")


def resolve_file(path: str) -> str:
    """The file (or DCP or ZeRO folder) that holds the checkpoint at ``path``."""
    if os.path.isdir(path) and not is_dcp_folder(path) and not zero_folder.is_zero_folder(path):
        return find_index(path) or _single_weights_file(path)
    return path


@contextmanager
def reading(path: str) -> Iterator[None]:
    """An OSError (or a short read's struct.error) while opening ``path``: InputError."""
    try:
        yield
    except (OSError, struct.error) as exc:
        raise InputError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def open_in_snapshot(name: str, open_folder: Callable[[str], C]) -> C:
    """``hf://org/name[@revision]`` opened by ``open_folder`` as its snapshot folder in the
    Hugging Face cache; errors and ``Checkpoint.path`` give the name, not the cache path."""
    snapshot = hub.resolve(name)
    with hub.named_as(snapshot):
        ckpt = open_folder(snapshot.folder)
    if ckpt is not None:
        ckpt.path = snapshot.name
    return ckpt


def choose_prefix_container(ckpt: Checkpoint[Any], key: str | None) -> None:
    """Flat formats (DCP, safetensors) nest containers as name prefixes: ``model.fc.weight``."""
    heads = {name.split(".", 1)[0] for name in ckpt.tensors}
    candidates = [h for h in CONTAINER_PREFERENCE if h in heads]
    if (
        ckpt.format == "dcp"
        and heads
        and heads <= set(CONTAINER_PREFERENCE) | {"optim", "optimizer"}
    ):
        ckpt.containers = sorted(heads)
        if key is None and candidates:
            key = candidates[0]
            ckpt.note = f"container {key!r} chosen (DCP entries are named '{key}.*')"
    if key is None:
        return
    prefix = key.replace("/", ".") + "."
    picked = {n[len(prefix) :]: ref for n, ref in ckpt.tensors.items() if n.startswith(prefix)}
    if not picked:
        raise UsageError(f"--key {key!r}: no tensors named '{prefix}*' in {ckpt.path}")
    ckpt.tensors = picked
    ckpt.container = key
    ckpt.note = ckpt.note or f"container {key!r} chosen with --key"
