"""torch zip files read as structure: each tensor is where its bytes lie, nothing is loaded.

``torch.load`` materialises (or memory-maps, and so faults in) every tensor; a DeepSpeed
optimizer file holds the fp32 master weights of one rank and both Adam moments beside them,
of which a reader wants a slice at a time. Here ``data.pkl`` is unpickled by an unpickler
that admits an exact list of globals (checked literally, never as a dotted path): torch's
tensor and storage rebuilders, replaced by functions that only record arguments, a few
builtin containers, and the classes a caller names, which become :class:`PickledRecord`
objects holding the data the pickle gave them. No class a pickle names is imported and no
method of one runs; any other global is an :class:`~ckptsurgeon.errors.UnsafeInputError`
naming it. Torch-free: dtypes are torch's names (``"float32"``).
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ckptsurgeon.errors import InputError, UnsafeInputError

# torch's pickled storage class names -> (dtype name, bytes per element).
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("float64", 8), "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2), "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8), "IntStorage": ("int32", 4), "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8), "ComplexDoubleStorage": ("complex128", 16),
    "Float8_e4m3fnStorage": ("float8_e4m3fn", 1), "Float8_e5m2Storage": ("float8_e5m2", 1),
}  # fmt: skip

# torch dtypes a pickle may name as globals (``torch.float16``, a loss scaler's dtype, say).
DTYPE_GLOBALS = frozenset(d for d, _ in STORAGE_DTYPES.values())

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header
_LOCAL_MAGIC = 0x04034B50


class PickledRecord:
    """An object of a class a pickle names, kept as plain data: the arguments the pickle
    called the class with (``args``; an enum member's value) and the state it set
    (``state``; a plain object's ``__dict__``). Nothing of the named class runs.

    Each admitted name gets its own subclass (:func:`record_classes`), whose
    ``pickled_as`` says which class the pickle meant.
    """

    pickled_as: ClassVar[str] = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any) -> PickledRecord:
        record = super().__new__(cls)
        record.args = args
        record.state = None
        return record

    def __init__(self, *args: Any) -> None:  # the arguments were kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str, default: Any = None) -> Any:
        """``name`` from the state the pickle set, as the object's attribute would be."""
        return self.state.get(name, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"<{self.pickled_as} args={self.args!r} state={self.state!r}>"


def record_classes(names: Iterable[str]) -> dict[str, type[PickledRecord]]:
    """One :class:`PickledRecord` subclass per ``module.Class`` name."""
    return {
        name: type(name.rpartition(".")[2], (PickledRecord,), {"pickled_as": name})
        for name in names
    }


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a torch zip file, not read: its storage's bytes in the file (``offset``,
    ``storage_bytes``) and the view torch would make of them (in elements)."""

    path: str
    offset: int  # of the storage's first byte in the file
    storage_bytes: int
    dtype: str
    itemsize: int
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_contiguous(self) -> bool:
        """Row-major and dense, so elements ``a..b`` are one run of bytes."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def byte_range(self, start: int = 0, length: int | None = None) -> tuple[int, int]:
        """(file offset, byte count) of elements ``start`` to ``start + length`` of a
        contiguous tensor, counted in its row-major order."""
        if not self.is_contiguous:
            raise ValueError("byte_range of a non-contiguous tensor")
        length = self.numel - start if length is None else length
        if start < 0 or length < 0 or start + length > self.numel:
            raise ValueError(f"elements {start}..{start + length} of {self.numel}")
        first = self.offset + (self.storage_offset + start) * self.itemsize
        return first, length * self.itemsize


@dataclass(frozen=True)
class _Storage:
    """A storage named by a pickle's persistent id: its bytes in the file."""

    path: str
    key: str
    offset: int
    nbytes: int
    dtype: str
    itemsize: int


class _TypeMarker:
    """Stands for a class a pickle names only as data (``torch.Tensor`` as the type in
    ``_rebuild_from_type_v2``); calling it is refused, so it can build nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> StoredTensor:
    """What ``torch._utils._rebuild_tensor_v2`` would view, checked against the storage."""
    ints = (int,)
    if not (
        isinstance(storage, _Storage)
        and isinstance(storage_offset, ints)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(x, ints) and x >= 0 for x in (storage_offset, *size, *stride))
    ):
        raise InputError("a tensor with a malformed storage, offset, shape or stride")
    last = (
        storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if all(size)
        else -1
    )
    if (last + 1) * storage.itemsize > storage.nbytes:
        raise InputError(
            f"tensor of shape {tuple(size)} needs more than storage {storage.key}'s "
            f"{storage.nbytes} bytes (truncated?)"
        )
    return StoredTensor(
        storage.path,
        storage.offset,
        storage.nbytes,
        storage.dtype,
        storage.itemsize,
        storage_offset,
        tuple(size),
        tuple(stride),
    )


def _rebuild_parameter(data: Any, requires_grad: Any = False, *rest: Any) -> Any:
    """``_rebuild_parameter`` / ``_rebuild_parameter_with_state``: the tensor itself."""
    if not isinstance(data, StoredTensor):
        raise InputError("a parameter without a tensor")
    return data


_TENSOR_TYPES = {"torch.Tensor", "torch.nn.parameter.Parameter"}


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` for plain tensors and parameters only."""
    if func not in _REBUILDERS.values() or not (
        isinstance(new_type, _TypeMarker) and new_type.name in _TENSOR_TYPES
    ):
        raise InputError(f"a tensor of type {new_type!r}, not a plain tensor")
    return func(*args)


_REBUILDERS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
}

_CONTAINERS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch.Size": tuple,  # a shape; a tuple of ints is all a reader needs of it
}


class _StructureUnpickler(pickle.Unpickler):
    def __init__(
        self,
        file: Any,
        storages: Callable[[str, str, int], _Storage],
        records: dict[str, type[PickledRecord]],
    ) -> None:
        super().__init__(file)
        self._storages = storages
        self._records = records

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if "." not in name:  # a dotted name would be followed attribute by attribute
            if full in _REBUILDERS:
                return _REBUILDERS[full]
            if full in _CONTAINERS:
                return _CONTAINERS[full]
            if full in self._records:
                return self._records[full]
            if full in _TENSOR_TYPES:
                return _TypeMarker(full)
            if module == "torch" and name in STORAGE_DTYPES:
                return _TypeMarker(full)
            if module == "torch" and name in DTYPE_GLOBALS:
                return _TypeMarker(full)  # a dtype as a value: its name is enough
        raise UnsafeInputError(full)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InputError(f"unknown persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        kind_name = kind.name.rpartition(".")[2] if isinstance(kind, _TypeMarker) else None
        if kind_name not in STORAGE_DTYPES or not isinstance(numel, int):
            raise InputError(f"storage {key!r} of unknown type {kind!r}")
        return self._storages(str(key), kind_name, numel)


@dataclass(frozen=True)
class _Member:
    offset: int  # of the member's first data byte
    size: int


def _members(path: str, archive: zipfile.ZipFile) -> dict[str, _Member]:
    """Where each stored (uncompressed) member's bytes start, from its local header."""
    found: dict[str, _Member] = {}
    with open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
            if len(head) != _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(head)[0] != _LOCAL_MAGIC:
                raise InputError(f"{path}: corrupt zip member {info.filename!r}")
            name_len, extra_len = _LOCAL_HEADER.unpack(head)[-2:]
            found[info.filename] = _Member(
                info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, info.file_size
            )
    return found


def load_structure(path: str, records: dict[str, type[PickledRecord]]) -> Any:
    """The object a torch zip file (``torch.save``'s default format) holds, every tensor a
    :class:`StoredTensor` and every object of a class in ``records`` that class's record.

    Raises UnsafeInputError naming a global outside the admitted ones, InputError for a
    file that is not a torch zip file, or is corrupt or truncated.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise InputError(f"{path}: not a torch zip file (no single data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            _check_byteorder(path, archive, prefix)
            members = _members(path, archive)
            size = os.path.getsize(path)

            def storage(key: str, kind: str, numel: int) -> _Storage:
                dtype, itemsize = STORAGE_DTYPES[kind]
                member = members.get(f"{prefix}data/{key}")
                if member is None:
                    raise InputError(f"storage {key!r} is not in the archive")
                if member.size < numel * itemsize or member.offset + member.size > size:
                    raise InputError(f"storage {key!r} is cut short (truncated file?)")
                return _Storage(path, key, member.offset, numel * itemsize, dtype, itemsize)

            with archive.open(pickles[0]) as f:
                return _StructureUnpickler(f, storage, records).load()
    except UnsafeInputError as exc:
        raise UnsafeInputError(
            f"{path}: refusing to load: the pickle needs {exc}, which is not admitted "
            "(nothing in it was run)"
        ) from None
    except InputError as exc:
        message = str(exc)
        raise InputError(message if message.startswith(path) else f"{path}: {message}") from None
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"{path}: corrupt or truncated torch file ({_first_line(exc)})") from None
    except Exception as exc:  # a malformed pickle fails in many ways; all mean "corrupt"
        raise InputError(f"{path}: corrupt torch pickle ({type(exc).__name__})") from None


def _check_byteorder(path: str, archive: zipfile.ZipFile, prefix: str) -> None:
    try:
        order = archive.read(f"{prefix}byteorder").decode().strip()
    except KeyError:
        order = "little"  # files written before torch recorded it are little-endian
    if order != sys.byteorder:
        raise InputError(f"{path}: stored {order}-endian; only {sys.byteorder}-endian is read")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
