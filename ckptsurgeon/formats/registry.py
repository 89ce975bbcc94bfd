"""Every format family ckptsurgeon knows, built-in and plug-in, and the questions put to
them: which format a path holds, which file holds it, which output a path names.

Built-in families are named here as ``module:Class``, exactly as a plug-in's entry point
names its own (group ``ckptsurgeon.formats``), and both are imported the first time the
registry is asked anything: so each family's module is the only place that knows its
format, and a plug-in is detected, opened, inspected, verified and written like a
built-in. A plug-in that fails to load, is not a :class:`~ckptsurgeon.formats.family.Format`
or reuses a taken name is skipped with one warning (:mod:`ckptsurgeon.plugins`); one whose
sniff raises is warned about and passed over for that path.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from ckptsurgeon import plugins
from ckptsurgeon.errors import InputError, UsageError
from ckptsurgeon.formats.family import Format, Output, Probe, Sniff
from ckptsurgeon.formats.index import find_index

if TYPE_CHECKING:
    from ckptsurgeon.formats.checkpoint import Checkpoint

# Ties in confidence go to the family listed first; plug-ins come after every built-in.
BUILTINS = (
    "ckptsurgeon.formats.families.safetensors:SafetensorsFormat",
    "ckptsurgeon.formats.families.torch:TorchFormat",
    "ckptsurgeon.formats.families.dcp:DcpFormat",
    "ckptsurgeon.formats.families.zero:ZeroFormat",
    "ckptsurgeon.formats.families.gguf:GgufFormat",
)

# The family whose folder a path with no suffix and no output.format names.
DEFAULT_FOLDER_FORMAT = "safetensors"


@dataclass(frozen=True)
class Family:
    """A registered family and where it comes from (None: built into ckptsurgeon)."""

    format: Format
    distribution: str | None = None

    @property
    def name(self) -> str:
        return self.format.name

    def label(self) -> str:
        """How messages name it: ``format 'npz' (plug-in ckptsurgeon-npz 0.1.0)``."""
        where = f" (plug-in {self.distribution})" if self.distribution else ""
        return f"format {self.name!r}{where}"


@dataclass(frozen=True)
class Detected:
    """What a path holds: the family, the format it found, and the file (or folder) to open."""

    family: Family
    format: str
    file: str


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _instance(obj: Any) -> Format | None:
    if isinstance(obj, type) and issubclass(obj, Format):
        obj = obj()
    return obj if isinstance(obj, Format) and isinstance(getattr(obj, "name", None), str) else None


@cache
def families() -> tuple[Family, ...]:
    """Every family, built-ins first, then plug-ins in entry point order."""
    found = [Family(_load(spec)()) for spec in BUILTINS]
    names = {f.name for f in found}
    formats = {fmt for f in found for fmt in f.format.formats}
    kinds = {o.kind for f in found for o in f.format.outputs}

    made: list[Format] = []  # each accepted plug-in's instance, built once

    def accept(name: str, obj: Any) -> str | None:
        fmt = _instance(obj)
        if fmt is None:
            return f"{obj!r} is not a ckptsurgeon.formats.family.Format"
        taken = [n for n in (fmt.name,) if n in names]
        taken += [n for n in fmt.formats if n in formats]
        taken += [o.kind for o in fmt.outputs if o.kind in kinds]
        if taken:
            return f"the name {taken[0]!r} is already taken"
        names.add(fmt.name)
        formats.update(fmt.formats)
        kinds.update(o.kind for o in fmt.outputs)
        made.append(fmt)
        return None

    accepted = plugins.load_group(plugins.FORMATS_GROUP, accept)
    found += [Family(fmt, dist) for fmt, (dist, _) in zip(made, accepted, strict=True)]
    return tuple(found)


def family_named(name: str) -> Family | None:
    return next((f for f in families() if f.name == name), None)


def family_of(fmt: str) -> Family:
    """The family that reads checkpoint format ``fmt`` (``Checkpoint.format``)."""
    for family in families():
        if fmt in family.format.formats:
            return family
    raise KeyError(fmt)


def output_format_names() -> tuple[str, ...]:
    """The names ``output.format`` and ``convert --format`` accept: families that write."""
    return tuple(f.name for f in families() if f.format.outputs)


# -- detection -------------------------------------------------------------------------


def detect(path: str) -> Detected:
    """The family and format of the checkpoint at ``path`` (a file or a folder), and the
    file that holds it. A folder no family claims is a Hugging Face-style folder: its
    shard index, or its one weights file. ``hf://`` names are resolved by the caller."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")
    probe = Probe.of(path)
    best = _best_sniff(probe)
    if best is not None:
        return Detected(best[0], best[1].format, path)
    if probe.is_dir:
        return detect(find_index(path) or _single_weights_file(path))
    raise InputError(
        f"{path}: unrecognised format (not safetensors, a torch file, GGUF, an index or DCP"
        + "".join(f", {f.name}" for f in families() if f.distribution)
        + ")"
    )


def _best_sniff(probe: Probe) -> tuple[Family, Sniff] | None:
    best: tuple[Family, Sniff] | None = None
    for family in families():
        try:
            sniff = family.format.sniff(probe)
        except Exception as exc:
            if family.distribution is None:
                raise  # about the input: a ZeRO folder's bad tag, an unreadable file
            sniff = _sniff_failed(family, probe, f"raised {type(exc).__name__}: {exc}")
        if sniff is not None and (best is None or sniff.confidence > best[1].confidence):
            best = (family, sniff)
    return best


def _sniff_failed(family: Family, probe: Probe, what: str) -> None:
    plugins.warn(f"{family.label()} skipped for {probe.path}: its sniff {what}")
    return None


def _single_weights_file(folder: str) -> str:
    names = sorted(os.listdir(folder))
    for family in families():
        for preferred in family.format.folder_files:
            if preferred in names:
                return os.path.join(folder, preferred)
    for family in families():
        suffixes = family.format.folder_suffixes
        found = [n for n in names if suffixes and n.endswith(suffixes) and not n.startswith(".")]
        if len(found) == 1:
            return os.path.join(folder, found[0])
        if len(found) > 1:
            raise InputError(f"{folder}: several weight files ({', '.join(found)}); name one")
    raise InputError(f"{folder}: no checkpoint found (no index, weights file or DCP metadata)")


# -- writing ---------------------------------------------------------------------------


def output_for(path: str, format: str | None = None) -> tuple[Family, Output]:
    """The family and output that ``path`` names, from ``format`` (an output.format name)
    when given, which must agree with the suffix; else from the suffix (no suffix: a
    Hugging Face-style folder). UsageError otherwise."""
    suffix = os.path.splitext(path)[1]
    owner = next(
        (
            (f, o)
            for f in families()
            for o in f.format.outputs
            if o.suffixes and path.endswith(o.suffixes)
        ),
        None,
    )
    if format is None:
        if owner is not None:
            return owner
        if suffix:
            raise UsageError(
                f"output {path}: unknown suffix; use {_suffix_list()}, or no suffix for a "
                "Hugging Face-style folder (or format dcp for a DCP folder)"
            )
        family = family_named(DEFAULT_FOLDER_FORMAT)
        assert family is not None
        return family, next(o for o in family.format.outputs if o.folder)
    family = family_named(format)
    if family is None or not family.format.outputs:
        raise UsageError(f"output format {format!r}: one of {', '.join(output_format_names())}")
    mine = family.format.output_for(path)
    if mine is not None:
        return family, mine
    files = [o for o in family.format.outputs if not o.folder]
    folder = next((o for o in family.format.outputs if o.folder), None)
    if not files:
        if owner is None:  # a folder may have a dot in its name: "run.v2"
            return family, folder  # type: ignore[return-value]
        raise UsageError(
            f"output {path}: format {format} writes a folder, but the path names a "
            f"{suffix} file; give a path with no suffix"
        )
    if folder is None:
        raise UsageError(
            f"output {path}: format {format} writes one {files[0].noun}; give a "
            f"{_or(files[0].suffixes)} path"
        )
    if owner is None:
        raise UsageError(
            f"output {path}: unknown suffix; use {_suffix_list()}, or no suffix for a "
            "Hugging Face-style folder (or format dcp for a DCP folder)"
        )
    other, output = owner
    raise UsageError(
        f"output {path}: format {format}, but the {suffix} suffix names a {other.name} "
        f"{output.noun.removesuffix(' file')}; give a {_or(files[0].suffixes)} path or a folder"
    )


def _or(suffixes: tuple[str, ...]) -> str:
    return suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"


def _suffix_list() -> str:
    return ", ".join(
        "/".join(o.suffixes) for f in families() for o in f.format.outputs if o.suffixes
    )


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """What ``inspect`` adds for ``ckpt``'s format (see Format.describe)."""
    try:
        return family_of(ckpt.format).format.describe(ckpt)
    except KeyError:
        return {}
