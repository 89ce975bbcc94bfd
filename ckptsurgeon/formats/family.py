"""The one interface every checkpoint format family implements, built-in or plug-in.

A family (safetensors, torch pickles, DCP, DeepSpeed ZeRO, GGUF, a plug-in's own) is one
:class:`Format` subclass: it says how sure it is that a path holds its format
(:meth:`Format.sniff`), opens it as a lazy table (:meth:`Format.open`, and where the format
allows it without torch, :meth:`Format.open_header`), checks what the file recorded about
its own bytes (:meth:`Format.verify`), and, when it writes, which outputs it makes
(:attr:`Format.outputs`) and how (:meth:`Format.write`).

:mod:`~ckptsurgeon.formats.registry` holds the families and asks them; nothing else
dispatches on a format's name. This module imports no torch, so that detection and the
header-only ``inspect`` stay torch-free.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ckptsurgeon.errors import UsageError

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint
    from ckptsurgeon.formats.safetensors_io import Verdict
    from ckptsurgeon.formats.table import TensorRef

# How many leading bytes of a file :class:`Probe` reads: every built-in magic fits in 9.
HEAD_BYTES = 16


@dataclass(frozen=True)
class Probe:
    """What detection knows about a path before any format opens it."""

    path: str
    is_dir: bool
    head: bytes  # the file's first HEAD_BYTES bytes; b"" for a folder
    size: int  # the file's size; 0 for a folder

    @classmethod
    def of(cls, path: str) -> Probe:
        if os.path.isdir(path):
            return cls(path, True, b"", 0)
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        return cls(path, False, head, os.path.getsize(path))

    def has(self, name: str) -> bool:
        """Whether this folder holds a file called ``name``."""
        return self.is_dir and os.path.isfile(os.path.join(self.path, name))


@dataclass(frozen=True)
class Sniff:
    """A family's claim on a path: the checkpoint format it found, and how sure it is.

    Detection takes the highest ``confidence`` (built-ins first on a tie): 1.0 for a magic
    number or a marker file, lower for a claim from a suffix alone, which a plug-in that
    recognises the bytes can outbid."""

    format: str
    confidence: float


@dataclass(frozen=True)
class ReadRequest:
    """What :meth:`Format.open` is asked to open."""

    path: str  # as the caller named it (Checkpoint.path): a file, a folder, an hf:// name
    file: str  # the file or folder that holds the checkpoint
    format: str  # the format the family's sniff reported
    key: str | None = None  # a nested container (only for families with nested=True)
    allow_globals: tuple[str, ...] = ()  # pickle classes admitted (families that unpickle)


@dataclass(frozen=True)
class Output:
    """One kind of output a family writes: a file with one of ``suffixes``, or a folder
    (a path with no suffix) when ``suffixes`` is empty."""

    kind: str  # "safetensors", "folder", "torch", "dcp", a plug-in's name
    suffixes: tuple[str, ...] = ()
    noun: str = "file"  # in messages: "format torch writes one pickle file"

    @property
    def folder(self) -> bool:
        return not self.suffixes


@dataclass(frozen=True)
class WriteRequest:
    """What :meth:`Format.write` is asked to write, besides the tensors."""

    output: Output
    metadata: dict[str, str]  # provenance: producer, source, the up-to-date record
    max_shard_size: int | None  # bytes per file of a folder output; None: the family's own
    durable: bool  # fsync what is written (the rename around it is the caller's)
    on_bytes: Callable[[int], None] | None  # called with each tensor's bytes once written


Items = Sequence[tuple[str, "TensorRef"]]


class Format(ABC):
    """A checkpoint format family. Subclasses set the class attributes, implement
    :meth:`sniff` and :meth:`open` (every family reads), and override the other methods
    their format supports; a plug-in declares its subclass as an entry point in the group
    ``ckptsurgeon.formats`` (one that leaves sniff or open out cannot be built, and is
    skipped with a warning)."""

    name: ClassVar[str]  # the family, and the output.format / convert --format name
    description: ClassVar[str] = ""  # one line, for `ckptsurgeon env`
    # The checkpoint formats it reads, as `inspect` reports them ("torch-zip", ...).
    formats: ClassVar[tuple[str, ...]] = ()
    # Formats whose containers nest inside the file (a pickle's dicts) and are chosen while
    # opening; in the others containers are name prefixes ("model.fc.weight"), which the
    # registry chooses afterwards.
    nested: ClassVar[tuple[str, ...]] = ()
    # Files a Hugging Face-style folder is searched for, most preferred first: exact names,
    # then suffixes (a folder with one such file opens as that file).
    folder_files: ClassVar[tuple[str, ...]] = ()
    folder_suffixes: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()  # empty: the family only reads

    @abstractmethod
    def sniff(self, probe: Probe) -> Sniff | None:
        """This family's claim on ``probe``, or None. Must not raise for a file that is
        not its format; reads no more than it needs."""

    @abstractmethod
    def open(self, request: ReadRequest) -> Checkpoint:
        """The checkpoint as lazy tensor refs: headers and indexes read, data not."""

    def open_header(self, request: ReadRequest) -> Checkpoint | None:
        """The checkpoint from its headers alone, without importing torch (``inspect``);
        None where that is not possible (the registry then calls :meth:`open`)."""
        return None

    def verify(self, ckpt: Checkpoint) -> list[Verdict]:
        """One verdict per file: what the format recorded about its bytes, recomputed."""
        from ckptsurgeon.formats.safetensors_io import Verdict

        return [Verdict(ckpt.path, "unrecorded", f"{ckpt.format}: no recorded checksums")]

    def describe(self, ckpt: Checkpoint) -> dict[str, Any]:
        """Fields ``inspect`` adds to its summary for this format (GGUF: what is stored)."""
        return {}

    def check_names(self, names: Sequence[str]) -> None:
        """Raise FitError for a tensor name this format cannot hold (most hold any)."""
        return None

    def write(self, tmp: str, items: Items, request: WriteRequest) -> list[str]:
        """Write ``items`` to ``tmp`` (the temporary file, or the temporary folder to fill);
        returns the names written inside a folder output, [] for a file."""
        raise UsageError(f"format {self.name} does not write")

    def output_for(self, path: str) -> Output | None:
        """The output this family writes at ``path`` (by suffix, or a folder), or None."""
        suffix = os.path.splitext(path)[1]
        for output in self.outputs:
            if (suffix and path.endswith(output.suffixes)) or (not suffix and output.folder):
                return output
        return None
