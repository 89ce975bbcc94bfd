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

from ckptsurgeon import _torchcheck
from ckptsurgeon.errors import InputError, UnsafeInputError, UsageError
from ckptsurgeon.formats.checkpoint import (  # noqa: F401 (suffixes re-exported)
    CONTAINER_PREFERENCE,
    TORCH_OUTPUT_SUFFIXES,
    TORCH_SUFFIXES,
    did_you_mean,
    show_containers,
)

# Modules whose classes can run code or reach the system; never admitted, even when named.
BLOCKED_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil",
    "importlib", "pickle", "_pickle", "copyreg", "marshal", "types", "socket", "ctypes",
    "runpy", "code", "codeop", "pty", "platform", "webbrowser", "multiprocessing", "signal",
    "functools", "operator", "io", "_io", "tempfile", "glob", "asyncio",
    "torch.jit", "torch._C", "torch.ops", "torch.hub", "torch.serialization", "numpy.lib",
})  # fmt: skip

# Functions that may be admitted by name: numpy's array and scalar rebuilders, which torch's
# documentation names for checkpoints holding numpy values. They build data and call nothing
# else; any other admitted global must be a class (constructing it is all a pickle can do).
ADMISSIBLE_FUNCTIONS = frozenset({
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
})  # fmt: skip

_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")
# A class the unpickler was asked to build (numpy's dtype classes, say), which the static scan
# cannot see because it is reached through another admitted global.
_BUILT_IN_MESSAGE = re.compile(r"but got <class '([\w.]+)'>")


def resolve_allowed_globals(names: Iterable[str]) -> list[tuple[Any, str]]:
    """Turn ``module.Name`` strings into ``(object, name)`` pairs for torch's
    ``safe_globals``: the classes (or :data:`ADMISSIBLE_FUNCTIONS`) they name, under the
    name as given, which is the one a pickle uses (``numpy.core.multiarray.scalar`` from
    numpy 1 is ``numpy._core.multiarray.scalar`` under numpy 2).

    Raises UsageError for a malformed name, a blocked module or any other function.
    """
    classes: list[tuple[Any, str]] = []
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
        if not isinstance(obj, type) and full not in ADMISSIBLE_FUNCTIONS:
            raise UsageError(f"--allow-global {full}: only classes can be admitted, not {obj!r}")
        if _is_blocked(getattr(obj, "__module__", None) or module_name):  # a re-export
            raise UsageError(f"--allow-global {full}: defined in {obj.__module__}, never admitted")
        classes.append((obj, full))
    return classes


def is_torch_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_blocked(module_name: str) -> bool:
    parts = module_name.split(".")
    return any(".".join(parts[: i + 1]) in BLOCKED_MODULES for i in range(len(parts)))


class _Opaque:
    """A value the static scan does not track (anything but a literal string)."""


_OPAQUE = _Opaque()
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
DYNAMIC_GLOBAL = "<a global whose name is computed while unpickling>"


def scan_globals(data: bytes, max_pickles: int = 5) -> list[str]:
    """Every ``module.name`` the pickle(s) at the start of ``data`` would import.

    Read statically (nothing is imported or run) by simulating the unpickler's stack and
    memo, so names fetched from the memo, moved with DUP/POP or hidden behind decoy strings
    are still attributed to the ``STACK_GLOBAL`` that uses them. Only used to *name* what
    torch's weights-only unpickler refused; that unpickler, which checks each global as it
    is loaded, is what keeps code from running. Legacy torch files hold several pickles back
    to back, then raw bytes: the scan stops at the first thing that does not parse.
    """
    found: list[str] = []
    pos = 0
    for _ in range(max_pickles):
        try:
            end = _scan_one(data, pos, found)
        except Exception:  # not (or no longer) a pickle: raw tensor bytes follow
            break
        if end is None:
            break
        pos = end
    return list(dict.fromkeys(n.replace("__builtin__.", "builtins.") for n in found))


def _scan_one(data: bytes, start: int, found: list[str]) -> int | None:
    """Scan one pickle from ``start``; the offset after its STOP, or None if it has none."""
    stack: list[object] = []
    metastack: list[list[object]] = []
    memo: dict[int, object] = {}

    def pop() -> object:
        return stack.pop() if stack else _OPAQUE

    def pop_mark() -> None:
        nonlocal stack
        stack = metastack.pop() if metastack else []

    for op, arg, at in pickletools.genops(data[start:]):
        name = op.name
        if name == "STOP":
            return start + at + 1
        if name == "MARK":
            metastack.append(stack)
            stack = []
        elif name == "POP":
            if stack:
                stack.pop()
            else:
                pop_mark()
        elif name == "DUP":
            stack.append(stack[-1] if stack else _OPAQUE)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _OPAQUE
        elif name in _PUT_OPS:
            memo[int(arg)] = stack[-1] if stack else _OPAQUE
        elif name in _GET_OPS:
            stack.append(memo.get(int(arg), _OPAQUE))
        elif name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
            if name == "INST":
                pop_mark()
            stack.append(_OPAQUE)
        elif name == "STACK_GLOBAL":
            attr, module = pop(), pop()
            ok = isinstance(module, str) and isinstance(attr, str)
            found.append(f"{module}.{attr}" if ok else DYNAMIC_GLOBAL)
            stack.append(_OPAQUE)
        elif [s.name for s in op.stack_after] in (["str"], ["bytes_or_str"]) and isinstance(
            arg, str
        ):
            stack.append(arg)
        else:
            before = [s.name for s in op.stack_before]
            if "mark" in before:
                pop_mark()
                for _ in range(before.index("mark")):
                    pop()
            else:
                for _ in before:
                    pop()
            stack.extend(_OPAQUE for _ in op.stack_after)
    return None


def pickle_bytes(path: str, limit: int = 64 << 20) -> bytes:
    """The pickle of a torch file: ``data.pkl`` inside a zip archive, else the file's start."""
    if is_torch_zip(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                return b""
            with archive.open(names[0]) as f:
                return f.read(limit)
    with open(path, "rb") as f:
        return f.read(limit)


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _warn_old_torch() -> None:
    """Once per process, for library users (the CLI warns at start-up instead)."""
    if not _torchcheck.warned:
        _torchcheck.warned = True
        message = _torchcheck.unpickler_warning(torch.__version__)
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_pickle(path: str, allow_globals: Iterable[str] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped for the zip format).

    Raises UnsafeInputError naming the offending global, InputError for corrupt files.
    """
    allowed = resolve_allowed_globals(allow_globals)
    _warn_old_torch()
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
        admitted = _admitted_names(allowed)
        try:
            names = [n for n in scan_globals(pickle_bytes(path)) if n not in admitted]
        except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError):
            names = []
        named = [n for n in names if not n.startswith(("torch.", "collections.", "_codecs."))]
        match = _GLOBAL_IN_MESSAGE.search(str(exc)) or _BUILT_IN_MESSAGE.search(str(exc))
        if match and match.group(1) not in named:
            named.insert(0, match.group(1))  # what torch itself refused comes first
        if named:
            raise _unsafe(path, named) from None
        raise InputError(f"{path}: not a loadable torch pickle: {_reason(exc)}") from None
    except Exception as exc:  # torch raises many types for corrupt bytes; all mean "corrupt"
        raise InputError(f"{path}: corrupt or truncated torch file: {_first_line(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The informative line of torch's weights-only refusal (not its advice to disable it)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            after = [line.split("WeightsUnpickler error:", 1)[1].strip(), *lines[i + 1 :]]
            reason = next((x for x in after if x), "")
            if reason.startswith("Unsupported operand"):
                reason += (
                    " (the weights-only unpickler reads the pickle protocol torch.save writes "
                    "by default, 2; re-save the file with that protocol where you trust it)"
                )
            return reason or _first_line(exc)
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unsafe(path: str, names: list[str]) -> UnsafeInputError:
    never = [n for n in names if _is_blocked(n.rpartition(".")[0] or n)]
    maybe = [n for n in names if n not in never and n != DYNAMIC_GLOBAL]
    message = f"{path}: refusing to load: the pickle needs {', '.join(names)}, outside torch's weights-only allowlist."
    if never:
        message += f" {', '.join(never)} can run code and is never admitted."
    if maybe:
        flags = " ".join(f"--allow-global {n}" for n in maybe)
        message += f" If you trust {', '.join(maybe)}, pass {flags}"
    return UnsafeInputError(message)


def _admitted_names(allowed: list[tuple[Any, str]]) -> set[str]:
    """Every name an admitted global may appear under: as given, and where it is defined."""
    return {n for obj, given in allowed for n in (given, f"{obj.__module__}.{obj.__qualname__}")}


def _refuse_unsafe_globals(path: str, allowed: list[tuple[Any, str]]) -> None:
    """Name every unsafe global at once (zip format only; read statically, nothing runs).

    torch's static scan reads protocol-2 pickles only (what ``torch.save`` writes by
    default); for other protocols it gives up and the weights-only unpickler, which checks
    every global as it loads, is left to refuse.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except pickle.UnpicklingError:
        return
    admitted = _admitted_names(allowed)
    refused = [n for n in names if n not in admitted]
    if refused:
        raise _unsafe(path, refused)


def find_containers(obj: Any, path: str = "", depth: int = 0) -> dict[str, Mapping]:
    """Every mapping inside ``obj`` that holds tensors, keyed by its ``a/b`` path. A whole
    pickled module (``torch.save(model)``, its classes admitted) counts as its state dict."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    found: dict[str, Mapping] = {}
    if not isinstance(obj, Mapping) or depth > 4:
        return found
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        found[path] = obj
    for key, value in obj.items():
        if isinstance(value, Mapping | torch.nn.Module):
            found.update(find_containers(value, f"{path}/{key}" if path else str(key), depth + 1))
    return found


def choose_container(containers: dict[str, Mapping], key: str | None) -> tuple[str, str]:
    """Pick the state dict: ``key`` when given, else the root, else by preference.

    Returns (chosen path, one-line explanation).
    """
    if key is not None:
        if key not in containers:
            hint = did_you_mean(key, containers)
            raise UsageError(
                f"--key {key!r}: no tensor container there{f'; {hint}' if hint else ''} "
                f"(found: {show_containers(containers)})"
            )
        return key, f"container {key!r} chosen with --key"
    if not containers:
        raise InputError("no tensors found in this checkpoint")
    preferred = next(
        (
            path
            for name in CONTAINER_PREFERENCE
            for path in containers
            if path and path.rsplit("/", 1)[-1] == name
        ),
        None,
    )
    if "" in containers:
        # A few tensors beside the real state dict (PyTorch's ImageNet example saves
        # best_acc1 as one) do not make the top level the weights.
        root = _tensor_count(containers[""])
        if preferred is None or root >= _tensor_count(containers[preferred]):
            return "", "tensors at the top level"
        return preferred, (
            f"container {preferred!r} chosen over {root} tensor(s) at the top level; "
            "pass --key to pick another"
        )
    if preferred is not None:
        return preferred, f"container {preferred!r} chosen (first of {CONTAINER_PREFERENCE[:3]}...)"
    largest = max(containers, key=lambda p: _tensor_count(containers[p]))
    return largest, f"container {largest!r} chosen as the largest; pass --key to pick another"


def _tensor_count(container: Mapping) -> int:
    return sum(isinstance(v, torch.Tensor) for v in container.values())
