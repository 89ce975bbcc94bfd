"""torch pickles: zip files (``torch.save``'s format since 1.6), legacy pickles, and
Hugging Face's sharded ``*.bin`` folders; read with ``weights_only`` and named classes only,
verified against each zip record's CRC-32, written with ``torch.save``."""

from __future__ import annotations

import errno
import zipfile
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

from ckptsurgeon.errors import InputError
from ckptsurgeon.formats.checkpoint import TORCH_OUTPUT_SUFFIXES, TORCH_SUFFIXES
from ckptsurgeon.formats.family import (
    Format,
    Items,
    Output,
    Probe,
    ReadRequest,
    Sniff,
    WriteRequest,
)

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint
    from ckptsurgeon.formats.safetensors_io import Verdict

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_2_PLUS = b"\x80"


class TorchFormat(Format):
    name = "torch"
    description = "torch.save pickles (zip and legacy) and sharded *.bin folders"
    formats = ("torch-zip", "torch-legacy", "torch-sharded")
    nested = ("torch-zip", "torch-legacy")
    folder_files = ("pytorch_model.bin",)
    folder_suffixes = TORCH_SUFFIXES
    outputs: ClassVar[tuple[Output, ...]] = (Output("torch", TORCH_OUTPUT_SUFFIXES, "pickle file"),)

    def sniff(self, probe: Probe) -> Sniff | None:
        if probe.is_dir:
            return None
        if probe.path.endswith(".index.json"):
            return Sniff("torch-sharded", 0.9)
        # Any zip is taken for torch's: a plug-in that knows its own zip (.npz) bids higher.
        if probe.head[:4] == ZIP_MAGIC:
            return Sniff("torch-zip", 0.6)
        if probe.head[:1] == PICKLE_PROTOCOL_2_PLUS:
            return Sniff("torch-legacy", 0.4)
        if probe.path.endswith(TORCH_SUFFIXES):
            return Sniff("torch-legacy", 0.3)
        return None

    def open(self, request: ReadRequest) -> Checkpoint:
        if request.format == "torch-sharded":
            return _open_sharded(request.path, request.file, request.allow_globals)
        return _open_pickle(request)

    def verify(self, ckpt: Checkpoint) -> list[Verdict]:
        return [_verify_zip(f) for f in ckpt.files if not f.endswith(".index.json")]

    def write(self, tmp: str, items: Items, request: WriteRequest) -> list[str]:
        _write_torch(tmp, items, request)
        return []


def _open_sharded(path: str, index_path: str, allow_globals: Iterable[str]) -> Checkpoint:
    import torch

    from ckptsurgeon.formats import torch_io
    from ckptsurgeon.formats.checkpoint import Checkpoint
    from ckptsurgeon.formats.index import read_index
    from ckptsurgeon.formats.table import Table, from_tensor

    index = read_index(index_path)
    table: Table = {}
    for shard in index.shards:
        obj = torch_io.load_pickle(shard, allow_globals)
        if not isinstance(obj, Mapping):
            raise InputError(f"{shard}: shard is not a mapping of tensors")
        for name, value in obj.items():
            if index.weight_map.get(name) != shard:
                raise InputError(
                    f"{index_path}: {name!r} is in {shard} but the index says "
                    f"{index.weight_map.get(name, 'nothing')}"
                )
            if isinstance(value, torch.Tensor):
                table[name] = from_tensor(value, name)
    missing = [n for n in index.weight_map if n not in table]
    if missing:
        raise InputError(
            f"{index_path}: {len(missing)} indexed tensors are in no shard (first: {missing[0]!r})"
        )
    return Checkpoint(path, "torch-sharded", table, files=[index_path, *index.shards])


def _open_pickle(request: ReadRequest) -> Checkpoint:
    import torch

    from ckptsurgeon.formats import torch_io
    from ckptsurgeon.formats.actions import Action
    from ckptsurgeon.formats.checkpoint import Checkpoint
    from ckptsurgeon.formats.table import Table, from_tensor

    path, key = request.path, request.key
    obj = torch_io.load_pickle(request.file, request.allow_globals)
    if isinstance(obj, torch.Tensor):
        obj = {"tensor": obj}
    containers = torch_io.find_containers(obj)
    if not containers and key is None:
        raise InputError(
            f"{path}: no tensors found (a pickled {type(obj).__name__}, not a state dict)"
        )
    chosen, note = torch_io.choose_container(containers, key)
    state = containers[chosen]
    table: Table = {}
    seen: dict[tuple[int, int, tuple, tuple], str] = {}
    aliases: dict[str, str] = {}
    skipped = densified = 0
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            skipped += 1
            continue
        name = str(name)
        if value.layout != torch.strided:  # sparse buffers: no format here stores them as such
            table[name] = from_tensor(value.detach().to_dense(), name, Action("read", "as dense"))
            densified += 1
            continue
        table[name] = from_tensor(value.detach(), name)
        ident = (
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
        )
        if value.numel() and ident in seen:
            aliases[name] = seen[ident]
        else:
            seen[ident] = name
    if skipped:
        note += f"; {skipped} non-tensor entries skipped"
    if densified:
        note += f"; {densified} sparse tensors read as dense"
    return Checkpoint(
        path,
        request.format,
        table,
        containers=list(containers),
        container=chosen or None,
        note=note,
        files=[request.file],
        aliases=aliases,
    )


def _verify_zip(path: str) -> Verdict:
    """torch zip files carry a CRC-32 per record, which ``torch.load`` never checks (a
    flipped byte loads silently); legacy pickles record nothing."""
    from ckptsurgeon.formats.safetensors_io import Verdict

    if not zipfile.is_zipfile(path):
        return Verdict(path, "unrecorded", "legacy torch format: no checksums")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return Verdict(path, "corrupt", f"unreadable zip archive ({exc})")
    if bad is not None:
        return Verdict(
            path, "corrupt", f"record {bad!r} fails its CRC-32 (torch.load does not check these)"
        )
    return Verdict(path, "ok", "every zip record matches its CRC-32")


def _write_torch(tmp: str, items: Items, request: WriteRequest) -> None:
    import torch

    from ckptsurgeon.formats.fsync import fsync_file

    state = {}
    for name, ref in items:
        tensor = ref.load()
        # A view into a bigger storage (one part of a split) would save the whole storage.
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        state[name] = tensor
        if request.on_bytes:
            request.on_bytes(ref.nbytes)
    with open(tmp, "wb") as f:
        sink = _RecordingWriter(f)
        try:
            torch.save(state, sink)
        except RuntimeError as exc:
            # torch turns a failed write (a full disk) into "unexpected pos 704 vs 598";
            # report the operating system's error instead.
            if sink.error is not None:
                raise sink.error from None
            raise OSError(errno.EIO, f"torch.save failed: {str(exc).strip()[:200]}") from None
        if request.durable:
            fsync_file(f)


class _RecordingWriter:
    """A binary file for ``torch.save`` that remembers the first OSError a write raised."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()
