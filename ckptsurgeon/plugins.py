"""Third-party plug-ins: formats and ops that other distributions declare as entry points.

A plug-in is an ordinary Python distribution whose metadata declares entry points in the
group ``ckptsurgeon.formats`` (a :class:`~ckptsurgeon.formats.registry.Format`) or
``ckptsurgeon.ops`` (an :class:`~ckptsurgeon.rules.ops.Op` subclass). Each registry calls
:func:`load_group` once, when it is first built, and decides itself what it accepts; this
module only finds, imports and accounts for them.

A plug-in must never take the built-ins down with it: one that fails to import, is not the
kind of object its group holds, or reuses a name already taken is skipped with a
:class:`PluginWarning` (one line, naming its distribution), and :func:`found` lists it with
what went wrong for ``ckptsurgeon env``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from ckptsurgeon.errors import CkptSurgeonWarning

FORMATS_GROUP = "ckptsurgeon.formats"
OPS_GROUP = "ckptsurgeon.ops"


class PluginWarning(CkptSurgeonWarning):
    """A plug-in was skipped; the built-ins and every other plug-in still work."""


@dataclass(frozen=True)
class PluginRecord:
    """One entry point of one distribution, and what became of it."""

    group: str
    name: str  # the entry point's name
    value: str  # "module:attribute"
    distribution: str  # "name version", or "?" when the metadata does not say
    loaded: bool
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_found: list[PluginRecord] = []


def found() -> list[PluginRecord]:
    """Every plug-in entry point seen so far, loaded or skipped, in load order."""
    return list(_found)


def distribution_of(entry: metadata.EntryPoint) -> str:
    dist = entry.dist
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"


def warn(message: str) -> None:
    """Say once, as one line, that a plug-in misbehaved (the CLI prints it on stderr)."""
    warnings.warn(message, PluginWarning, stacklevel=3)


def load_group(group: str, accept: Callable[[str, Any], str | None]) -> list[tuple[str, Any]]:
    """Import every entry point of ``group``; ``accept(name, obj)`` returns why an object
    may not join (a taken name, the wrong kind of object) or None to take it.

    Returns ``(distribution, obj)`` for those taken, sorted by entry point name so that the
    order never depends on how the environment lists its distributions."""
    taken: list[tuple[str, Any]] = []
    for entry in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
        dist = distribution_of(entry)
        try:
            obj = entry.load()
            problem = accept(entry.name, obj)
        except Exception as exc:  # a broken plug-in: anything it raises is its own fault
            problem = f"failed to load: {type(exc).__name__}: {exc}"
            obj = None
        _found.append(
            PluginRecord(group, entry.name, entry.value, dist, problem is None, problem or "")
        )
        if problem is not None:
            warn(f"plug-in {entry.name!r} ({group}) from {dist} skipped: {problem}")
            continue
        taken.append((dist, obj))
    return taken
