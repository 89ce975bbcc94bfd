"""What each command returns, as values: ``to_dict()`` is exactly what the command prints
with ``--json``, and the CLI's human output is derived from the same value.

Every result also reads as that dict (``result["ok"]``, ``result.get(...)``, ``dict(result)``),
because ``ckptsurgeon.apply`` and ``ckptsurgeon.verify`` returned plain dicts before they
returned these and callers index them.

This module imports no torch (nor anything else of the package at run time): the CLI's fast
paths (``inspect`` of safetensors headers, ``validate``, ``apply --skip-up-to-date``) build
these values before torch is loaded, if it is loaded at all.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptsurgeon.engine.report import ApplyReport
    from ckptsurgeon.engine.verify import VerifyResult
    from ckptsurgeon.formats.safetensors_io import Verdict
    from ckptsurgeon.suggest.diff import DiffReport


class Result(Mapping[str, Any]):
    """A command's result; read as a mapping it is its ``to_dict()`` (computed per access:
    call ``to_dict()`` once when reading many fields)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """What the command prints with ``--json``."""

    def __getitem__(self, name: str) -> Any:
        return self.to_dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(eq=False)
class ApplyResult(Result):
    """What ``apply`` did: the report of the run, or (``report`` None) that the output was
    already up to date and nothing ran."""

    output: str | None
    report: ApplyReport | None = None

    @property
    def up_to_date(self) -> bool:
        return self.report is None

    def to_dict(self) -> dict[str, Any]:
        if self.report is None:
            return {"output": self.output, "up_to_date": True}
        return self.report.to_dict()


@dataclass(eq=False)
class InspectResult(Result):
    """``inspect``: the summary (``tensors``, ``format``, ...; a valid target manifest) and,
    when checksums were recomputed, their verdicts (also in the summary as ``verify``)."""

    summary: dict[str, Any]
    verdicts: list[Verdict] | None = None

    def verify_lines(self) -> list[str]:
        """The human account of the verdicts (none when nothing was verified)."""
        from ckptsurgeon.formats import integrity

        return integrity.verify_lines(self.verdicts) if self.verdicts is not None else []

    def to_dict(self) -> dict[str, Any]:
        return self.summary


@dataclass(eq=False)
class DiffResult(Result):
    """``diff``: the comparison, and with ``suggest`` the rules file that reconciles A with
    B (and, when asked, the verification of that file's result)."""

    report: DiffReport
    suggest: bool = False
    rules_file: str | None = None
    verified: VerifyResult | None = None

    @property
    def same(self) -> bool:
        """A and B are the same (with ``suggest``: the rules make A load strictly into B)."""
        return self.report.reconciled if self.suggest else self.report.identical

    @property
    def ok(self) -> bool:
        """``same``, and the suggested rules' result verified when that was asked."""
        return self.same and (self.verified is None or self.verified.ok)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.report.to_dict()
        if self.verified is not None:
            out["verify"] = self.verified.to_dict()
        if self.rules_file is not None:
            out["rules_file"] = self.rules_file
        return out


@dataclass(frozen=True, eq=False)
class ConvertResult(Result):
    """``convert``: what was written (the fields of the writer's ``WriteResult``) and from
    what."""

    source: str
    path: str
    kind: str
    files: list[str]
    total_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.path,
            "kind": self.kind,
            "files": self.files,
            "bytes": self.total_bytes,
        }


@dataclass(frozen=True, eq=False)
class ValidateResult(Result):
    """``validate``: the rules file is valid (it raises otherwise); how many rules, and
    which optional sections it has."""

    path: str
    rules: int
    sections: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.path}: valid ({self.rules} rules)"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "valid": True, "rules": self.rules, "sections": self.sections}


@dataclass(eq=False)
class VerifyReport(Result):
    """``verify``: does the written ``output`` compute what the source computed?"""

    output: str | None
    result: VerifyResult

    @property
    def ok(self) -> bool:
        return self.result.ok

    def headline(self) -> str:
        verdict = "computes" if self.ok else "does NOT compute"
        return f"{self.output} {verdict} what the source computed"

    def lines(self) -> list[str]:
        return self.result.lines()

    def to_dict(self) -> dict[str, Any]:
        return self.result.to_dict()


@dataclass(eq=False)
class FinetuneResult(Result):
    """``finetune``: the training summary, or with ``dry_run`` the freeze and phases it
    would train."""

    data: dict[str, Any]
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.data
