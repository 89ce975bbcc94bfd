"""torch pickles (zip and legacy), read with ``weights_only=True`` and nothing else.

A global outside torch's allowlist is refused with its name; ``allow_globals`` admits named
classes, except from modules that can run commands or code, which are never admitted.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ckptsurgeon.errors import InputError, UnsafeInputError, UsageError

# Modules whose classes can run code or reach the system; never admitted, even when named.
BLOCKED_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil",
    "importlib", "pickle", "_pickle", "copyreg", "marshal", "types", "socket", "ctypes",
    "runpy", "code", "codeop", "pty", "platform", "webbrowser", "multiprocessing", "signal",
    "functools", "operator", "io", "_io", "tempfile", "pathlib", "glob", "asyncio",
    "torch.jit", "torch._C", "torch.ops", "torch.hub", "torch.serialization", "numpy.lib",
})  # fmt: skip

_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def resolve_allowed_globals(names: Iterable[str]) -> list[type]:
    """Turn ``module.Name`` strings into the classes they name.

    Raises UsageError for a malformed name, a blocked module or anything but a class.
    """
    classes: list[type] = []
    for full in names:
        module_name, _, attr = full.rpartition(".")
        if not module_name or not attr:
            raise UsageError(f"--allow-global {full!r}: expected module.Name")
        root = module_name.split(".")
        if any(".".join(root[: i + 1]) in BLOCKED_MODULES for i in range(len(root))):
            raise UsageError(
                f"--allow-global {full}: module {module_name} is never admitted "
                "(it can run code or reach the system)"
            )
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            raise UsageError(f"--allow-global {full}: no such class importable here") from None
        if not isinstance(obj, type):
            raise UsageError(f"--allow-global {full}: only classes can be admitted, not {obj!r}")
        classes.append(obj)
    return classes


def is_torch_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_pickle(path: str, allow_globals: Iterable[str] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped for the zip format).

    Raises UnsafeInputError naming the offending global, InputError for corrupt files.
    """
    allowed = resolve_allowed_globals(allow_globals)
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")
    zipped = is_torch_zip(path)
    if zipped:
        _refuse_unsafe_globals(path, allowed)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        match = _GLOBAL_IN_MESSAGE.search(str(exc))
        if match:
            raise _unsafe(path, [match.group(1)]) from None
        if "TorchScript" in str(exc):
            raise UnsafeInputError(
                f"{path}: a TorchScript archive; loading it would run its code. "
                "Export a state_dict from it where you trust it."
            ) from None
        raise InputError(f"{path}: not a loadable torch pickle: {_first_line(exc)}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{path}: corrupt or truncated torch file: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unsafe(path: str, names: list[str]) -> UnsafeInputError:
    flags = " ".join(f"--allow-global {n}" for n in names)
    listed = ", ".join(names)
    return UnsafeInputError(
        f"{path}: refusing to load: the pickle needs {listed}, outside torch's weights-only "
        f"allowlist. If you trust that class, pass {flags}"
    )


def _refuse_unsafe_globals(path: str, allowed: list[type]) -> None:
    """Name every unsafe global at once (zip format only; read statically, nothing runs)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # any parse failure here is a corrupt file
        raise InputError(f"{path}: corrupt or truncated torch file: {_first_line(exc)}") from None
    admitted = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    refused = [n for n in names if n not in admitted]
    if refused:
        raise _unsafe(path, refused)


# Containers a state dict is found under, most specific first (timm, Lightning, mmengine,
# and hand-written training loops); EMA copies last, so "the" weights win by default.
CONTAINER_PREFERENCE = (
    "state_dict", "model", "module", "model_state_dict", "net", "network", "params",
    "state_dict_ema", "model_ema", "ema",
)  # fmt: skip


def find_containers(obj: Any, path: str = "", depth: int = 0) -> dict[str, Mapping]:
    """Every mapping inside ``obj`` that holds tensors, keyed by its ``a/b`` path."""
    found: dict[str, Mapping] = {}
    if not isinstance(obj, Mapping) or depth > 4:
        return found
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        found[path] = obj
    for key, value in obj.items():
        if isinstance(value, Mapping):
            found.update(find_containers(value, f"{path}/{key}" if path else str(key), depth + 1))
    return found


def choose_container(containers: dict[str, Mapping], key: str | None) -> tuple[str, str]:
    """Pick the state dict: ``key`` when given, else the root, else by preference.

    Returns (chosen path, one-line explanation).
    """
    if key is not None:
        if key not in containers:
            known = ", ".join(repr(k) for k in containers) or "none"
            raise UsageError(f"--key {key!r}: no tensor container there (found: {known})")
        return key, f"container {key!r} chosen with --key"
    if not containers:
        raise InputError("no tensors found in this checkpoint")
    if "" in containers:
        return "", "tensors at the top level"
    for name in CONTAINER_PREFERENCE:
        for path in containers:
            if path.rsplit("/", 1)[-1] == name:
                return path, f"container {path!r} chosen (first of {CONTAINER_PREFERENCE[:3]}...)"
    largest = max(containers, key=lambda p: len(containers[p]))
    return largest, f"container {largest!r} chosen as the largest; pass --key to pick another"
