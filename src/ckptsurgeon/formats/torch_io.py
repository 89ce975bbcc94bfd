"""torch pickles (zip and legacy), read with ``weights_only=True`` and nothing else.

A global outside torch's allowlist is refused with its name; ``allow_globals`` admits named
classes, except from modules that can run commands or code, which are never admitted.
"""

from __future__ import annotations

import importlib
import os
import pickle
import pickletools
import re
import warnings
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
        if _is_blocked(module_name):
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


def _is_blocked(module_name: str) -> bool:
    parts = module_name.split(".")
    return any(".".join(parts[: i + 1]) in BLOCKED_MODULES for i in range(len(parts)))


def scan_globals(data: bytes, max_pickles: int = 5) -> list[str]:
    """Every ``module.name`` the pickle(s) at the start of ``data`` would import.

    Read statically (nothing is imported or run); used to name refused globals in full.
    Legacy torch files hold several pickles back to back, then raw bytes: the scan stops at
    the first thing that does not parse.
    """
    found: list[str] = []
    pos = 0
    for _ in range(max_pickles):
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for op, arg, at in pickletools.genops(data[pos:]):
                if (isinstance(arg, str) and "UNICODE" in op.name) or op.name == "SHORT_BINSTRING":
                    strings.append(str(arg))
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                    strings.append(memo[arg])
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if op.name == "STOP":
                    pos += at + 1
                    break
            else:
                break
        except Exception:  # not (or no longer) a pickle: raw tensor bytes follow
            break
    return list(dict.fromkeys(n.replace("__builtin__.", "builtins.") for n in found))


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def load_pickle(path: str, allow_globals: Iterable[str] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped for the zip format).

    Raises UnsafeInputError naming the offending global, InputError for corrupt files.
    """
    allowed = resolve_allowed_globals(allow_globals)
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")
    zipped = is_torch_zip(path)
    try:
        if zipped and _is_torchscript(path):
            raise UnsafeInputError(
                f"{path}: a TorchScript archive; loading it would run its code. "
                "Export a state_dict from it where you trust it."
            )
        if zipped:
            _refuse_unsafe_globals(path, allowed)
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or truncated torch file: {_first_line(exc)}") from None
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")  # torch's protocol notices are not for our users
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        admitted = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
        with open(path, "rb") as f:
            names = [n for n in scan_globals(f.read(1 << 20)) if n not in admitted]
        named = [n for n in names if not n.startswith(("torch.", "collections.", "_codecs."))]
        match = _GLOBAL_IN_MESSAGE.search(str(exc))
        if named or match:
            raise _unsafe(path, named or [match.group(1)]) from None
        raise InputError(f"{path}: not a loadable torch pickle: {_reason(exc)}") from None
    except Exception as exc:  # torch raises many types for corrupt bytes; all mean "corrupt"
        raise InputError(f"{path}: corrupt or truncated torch file: {_first_line(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The informative line of torch's weights-only refusal (not its advice to disable it)."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unsafe(path: str, names: list[str]) -> UnsafeInputError:
    never = [n for n in names if _is_blocked(n.rpartition(".")[0] or n)]
    maybe = [n for n in names if n not in never]
    message = f"{path}: refusing to load: the pickle needs {', '.join(names)}, outside torch's weights-only allowlist."
    if never:
        message += f" {', '.join(never)} can run code and is never admitted."
    if maybe:
        flags = " ".join(f"--allow-global {n}" for n in maybe)
        message += f" If you trust {', '.join(maybe)}, pass {flags}"
    return UnsafeInputError(message)


def _refuse_unsafe_globals(path: str, allowed: list[type]) -> None:
    """Name every unsafe global at once (zip format only; read statically, nothing runs)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
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
