"""NumPy ``.npz`` archives as a ckptsurgeon format.

An ``.npz`` file is a zip archive holding one ``.npy`` file per array, named after it
(NumPy documents both layouts in ``numpy.lib.format``). Opening reads each member's small
``.npy`` header for the shape and dtype; an array's data is read when its tensor is asked
for. Pickled object arrays are refused (``allow_pickle=False``): a checkpoint is data, not
code.

Like ckptsurgeon's own families, this module imports neither torch nor NumPy until a file
is opened or written: every command loads the format registry, and ``validate`` or
``schema`` should not pay for torch because a plug-in is installed.
"""

from __future__ import annotations

import os
import zipfile
from typing import TYPE_CHECKING, ClassVar

from ckptsurgeon.errors import FitError, InputError
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
    import torch

    from ckptsurgeon.formats.checkpoint import Checkpoint
    from ckptsurgeon.formats.table import TensorRef

ZIP_MAGIC = b"PK\x03\x04"


class NpzFormat(Format):
    name = "npz"
    description = "NumPy .npz archives (the plug-in example)"
    formats = ("npz",)
    outputs: ClassVar[tuple[Output, ...]] = (Output("npz", (".npz",), "npz archive"),)

    def sniff(self, probe: Probe) -> Sniff | None:
        # Any zip would do for torch's reader (0.6); a zip named .npz is ours.
        if probe.head[:4] == ZIP_MAGIC and probe.path.endswith(".npz"):
            return Sniff("npz", 0.9)
        return None

    def open(self, request: ReadRequest) -> Checkpoint:
        from ckptsurgeon.formats.checkpoint import Checkpoint
        from ckptsurgeon.formats.table import TensorRef

        table: dict[str, TensorRef] = {}
        try:
            with zipfile.ZipFile(request.file) as archive:
                for member in archive.namelist():
                    if member.endswith(".npy"):
                        name = member.removesuffix(".npy")
                        with archive.open(member) as f:
                            shape, dtype = _array_header(f)
                        table[name] = TensorRef(
                            shape, dtype, _loader(request.file, name), sources=(name,)
                        )
        except (zipfile.BadZipFile, ValueError) as exc:
            raise InputError(f"{request.file}: not a readable .npz archive ({exc})") from None
        return Checkpoint(request.path, "npz", table, files=[request.file])

    def write(self, tmp: str, items: Items, request: WriteRequest) -> list[str]:
        import numpy as np
        import torch

        arrays = {}
        for name, ref in items:
            if ref.dtype == torch.bfloat16:  # NumPy has no bfloat16
                raise FitError(f"{name}: npz cannot hold bfloat16; cast it with a rule first")
            arrays[name] = ref.load().numpy()
            if request.on_bytes:
                request.on_bytes(ref.nbytes)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            if request.durable:
                f.flush()
                os.fsync(f.fileno())
        return []


def _array_header(f) -> tuple[tuple[int, ...], torch.dtype]:
    import numpy as np
    import torch

    version = np.lib.format.read_magic(f)
    read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read is None:
        raise ValueError(f".npy format version {version}")
    shape, _fortran_order, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("an object array, which only a pickle can load")
    return tuple(shape), torch.from_numpy(np.empty(0, dtype)).dtype


def _loader(path: str, name: str):
    def load() -> torch.Tensor:
        import numpy as np
        import torch

        with np.load(path, allow_pickle=False) as archive:
            return torch.from_numpy(np.array(archive[name], order="C"))  # 0-d stays 0-d

    return load
