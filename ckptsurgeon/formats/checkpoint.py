"""An opened checkpoint, and what is found about one without torch: its format (which the
format registry finds from bytes and layout), the file that holds it, and the container its
flat names nest under.

:func:`~ckptsurgeon.formats.reader.open_checkpoint` opens every format as a
:class:`Checkpoint` of lazy tensor refs; ``inspect`` opens safetensors as one of header
entries (:func:`~ckptsurgeon.formats.header_table.open_header_checkpoint`), without
importing torch. Both find formats, files and containers with the functions here.
"""

from __future__ import annotations

import difflib
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ckptsurgeon.errors import CkptSurgeonError, InputError, PluginError, UsageError
from ckptsurgeon.formats import hub, registry
from ckptsurgeon.formats.family import ReadRequest
from ckptsurgeon.reporting.fold import fold_rows

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


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'model'?"`` naming the choices closest to ``word`` (a typo), or ""
    when none is close; for the end of an error message."""
    close = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def fold_names(names: Iterable[str], sep: str = ".") -> list[str]:
    """``names`` with those that differ only in indices folded into one pattern each, in
    order of first appearance: ``optimizer/state/0`` ... ``optimizer/state/61`` become
    ``optimizer/state/{0..61}`` (with ``sep="/"``). The folding is ``inspect``'s and the
    plan's (:func:`~ckptsurgeon.reporting.fold.fold_rows`), over segments split on ``sep``."""
    names = list(names)
    if sep == ".":
        return [row.name for row in fold_rows(names, name=str)]
    # fold_rows splits on dots: swap the separator in, keeping any dots a segment holds.
    swapped = [n.replace(".", "\x00").replace(sep, ".") for n in names]
    return [
        sep.join(_OUTSIDE_BRACES.split(row.name)).replace("\x00", ".")
        for row in fold_rows(swapped, name=str)
    ]


# A dot between segments of a folded name, not one of the ``..`` inside ``{0..61}``.
_OUTSIDE_BRACES = re.compile(r"\.(?![^{}]*\})")


def show_containers(containers: Iterable[str]) -> str:
    """The containers a checkpoint holds, quoted and folded for one line of a message:
    ``'model', 'optimizer/state/{0..61}'`` (the top level, ``""``, as ``(top level)``)."""
    shown = [repr(c) if c else "(top level)" for c in fold_names(containers, sep="/")]
    return ", ".join(shown) or "none"


def detect_format(path: str) -> str:
    """The format of the checkpoint at ``path``, as its family's sniff names it: one of
    safetensors, safetensors-sharded, torch-zip, torch-legacy, torch-sharded, dcp, gguf,
    deepspeed-zero1, deepspeed-zero2, deepspeed-zero3, or a plug-in's.

    ``hf://org/name[@revision]`` is the snapshot folder in the Hugging Face cache."""
    return detect(path).format


def detect(path: str) -> registry.Detected:
    """The family and format of the checkpoint at ``path``, and the file (or DCP or ZeRO
    folder) that holds it; an ``hf://`` name is looked up in the cache."""
    if hub.is_hf(path):
        snapshot = hub.resolve(path)
        with hub.named_as(snapshot):
            return detect(snapshot.folder)
    return registry.detect(path)


def open_detected(
    found: registry.Detected,
    path: str,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
    *,
    header: bool = False,
) -> Checkpoint[Any] | None:
    """Open what :func:`detect` found as ``path``; with ``header``, from its headers alone,
    or None where the family cannot (see Format.open_header).

    A plug-in's failures are its own: an exception other than ckptsurgeon's errors and
    OSError, or a result that is not a Checkpoint of tensor refs, is a PluginError naming
    it (exit 70) and nothing is written."""
    family = found.family
    request = ReadRequest(path, found.file, found.format, key, tuple(allow_globals))
    try:
        ckpt = family.format.open_header(request) if header else family.format.open(request)
    except (CkptSurgeonError, OSError):
        raise  # reading() turns an OSError into InputError
    except Exception as exc:
        if family.distribution is None:
            raise
        raise PluginError(
            f"{family.label()} failed to open {path}: {type(exc).__name__}: {exc}"
        ) from None
    if ckpt is None:
        return None
    if family.distribution is not None:
        _check_plugin_result(family, path, ckpt)
    if found.format not in family.format.nested:
        choose_prefix_container(ckpt, key)
    return ckpt


def _check_plugin_result(family: registry.Family, path: str, ckpt: Any) -> None:
    from ckptsurgeon.formats.table import TensorRef

    if not isinstance(ckpt, Checkpoint):
        raise PluginError(
            f"{family.label()} returned a {type(ckpt).__name__} for {path}, not a Checkpoint"
        )
    for name, ref in ckpt.tensors.items():
        if not isinstance(name, str) or not isinstance(ref, TensorRef):
            raise PluginError(
                f"{family.label()} returned a {type(ref).__name__} for {name!r} in {path}, "
                "not a TensorRef; nothing was written"
            )


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
    """Flat formats (DCP, safetensors) nest containers as name prefixes: ``model.fc.weight``;
    ``key`` picks one, and the tensors are renamed without it."""
    if key is None:
        return
    prefix = key.replace("/", ".") + "."
    picked = {n[len(prefix) :]: ref for n, ref in ckpt.tensors.items() if n.startswith(prefix)}
    if not picked:
        heads = [n.split(".", 1)[0] for n in ckpt.tensors if "." in n]
        hint = did_you_mean(key, [*ckpt.containers, *heads])
        raise UsageError(
            f"--key {key!r}: no tensors named '{prefix}*' in {ckpt.path}"
            + (f"; {hint}" if hint else "")
        )
    ckpt.tensors = picked
    ckpt.container = key
    ckpt.note = ckpt.note or f"container {key!r} chosen with --key"
