"""What one ``apply`` did, as a value: the plan per key, the check, the write, the fine-tune.

``to_dict()`` is the JSON of ``--json`` and ``--report`` (SPEC.md, "Apply report"); the
human table in :mod:`ckptsurgeon.reporting.plan` reads the same value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptsurgeon.formats.actions import Action
from ckptsurgeon.targets.check import CheckResult

if TYPE_CHECKING:
    from ckptsurgeon.engine.verify import VerifyResult


@dataclass(frozen=True)
class SourceInfo:
    """The checkpoint read: where, in which layout, and from which nested container."""

    path: str
    format: str
    container: str | None
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "container": self.container,
            "note": self.note,
        }


@dataclass(frozen=True)
class KeyEntry:
    """One output key: the source keys it comes from and what the rules did to it."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    actions: tuple[Action, ...]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sources": list(self.sources),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "actions": [str(a) for a in self.actions] or ["kept"],
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class Written:
    """The output on disk: its path, every file in it, and whether it was fsync'd."""

    path: str
    files: list[str]
    bytes: int
    durable: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "files": self.files,
            "bytes": self.bytes,
            "durable": self.durable,
        }


@dataclass
class ApplyReport:
    """The report of one ``apply``; ``written``, ``seconds``, ``verify`` and ``finetune`` are
    set by the steps that ran (a dry run has none of them, and ``finetune_plan`` instead
    when the document fine-tunes)."""

    source: SourceInfo
    target: str | None
    output: str | None
    dry_run: bool
    keys: list[KeyEntry]
    dropped: dict[str, str]
    counts: dict[str, int]
    total_bytes: int
    check: CheckResult | None
    written: Written | None = None
    seconds: dict[str, float] | None = None
    verify: VerifyResult | None = None
    finetune: dict[str, Any] | None = None
    up_to_date: bool | None = None  # asked with --skip-up-to-date: was it (then no plan)?
    # A dry run of a document with a finetune: section: the freeze and phases it would train.
    finetune_plan: dict[str, Any] | None = None

    @property
    def check_skipped(self) -> str | None:
        """Why no strict check ran (the rules name no ``target:``), or None when it ran."""
        return None if self.check is not None else "no target: strict check skipped"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source.to_dict(),
            "target": self.target,
            "output": self.output,
            "dry_run": self.dry_run,
            "keys": [k.to_dict() for k in self.keys],
            "dropped": [{"name": n, "reason": r} for n, r in self.dropped.items()],
            "counts": self.counts,
            "total_bytes": self.total_bytes,
            "check": self.check.to_dict() if self.check else None,
            # null when the check ran; else why not ("no target: strict check skipped")
            "check_skipped": self.check_skipped,
        }
        if self.written is not None:
            out["written"] = self.written.to_dict()
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.verify is not None:
            out["verify"] = self.verify.to_dict()
        if self.finetune is not None:
            out["finetune"] = self.finetune
        if self.up_to_date is not None:
            out["up_to_date"] = self.up_to_date
        if self.finetune_plan is not None:
            out["finetune_plan"] = self.finetune_plan
        return out
