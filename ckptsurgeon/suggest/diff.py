"""``diff``: two sides compared name by name, the differences explained, and the suggested
rules proved by running them.

The name-by-name comparison is the strict check itself (:func:`check_table` of the
checkpoint, untouched, against the target); the explanation is the inference
(:mod:`ckptsurgeon.suggest.infer`); the proof is the suggested rules run through
:func:`run_rules` and checked again, exactly as ``apply`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptsurgeon.engine.plan import run_rules
from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.reader import Checkpoint
from ckptsurgeon.rules.document import RulesFile, parse_rules
from ckptsurgeon.suggest.infer import Inference, infer_rules, plural
from ckptsurgeon.targets.check import CheckResult, check_table, group_names
from ckptsurgeon.targets.spec import TargetInfo

SHOWN = 10  # unresolved entries and shape differences printed before "... and N more"


@dataclass
class DiffReport:
    """What ``diff`` found for one checkpoint against one target."""

    source: Checkpoint
    target: TargetInfo
    before: CheckResult  # the checkpoint as it is, against the target
    inference: Inference
    rules: RulesFile  # the suggested rules, validated as a rules file
    after: CheckResult | None  # the strict check with the rules applied (None: they failed)
    failure: str | None = None  # why running the suggested rules failed

    @property
    def identical(self) -> bool:
        """Same names, shapes and dtypes on both sides (more than loading strictly, which
        allows a few differences torch smooths over: see ``before``)."""
        mine = {n: (r.shape, r.dtype) for n, r in self.source.tensors.items()}
        return mine == self.target.expected

    @property
    def reconciled(self) -> bool:
        """Do the suggested rules make the checkpoint load strictly into the target?"""
        return self.after is not None and self.after.ok

    def remaining(self) -> list[str]:
        """Why the suggested rules do not reconcile everything, one line each."""
        if self.reconciled:
            return []
        lines = self.after.lines() if self.after is not None else []
        lines += [u.reason for u in self.inference.unresolved]
        if self.failure:
            lines.append(f"the suggested rules failed: {self.failure}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The ``diff --json`` object."""
        before = self.before.to_dict()
        return {
            "a": {
                "path": self.source.path,
                "format": self.source.format,
                "container": self.source.container,
                "tensors": len(self.source.tensors),
            },
            "b": {"target": self.target.description, "tensors": len(self.target.expected)},
            "identical": self.identical,
            "only_in_a": before["unexpected"],
            "only_in_b": before["missing"],
            "tied_in_b": before["tied"],
            "shape_mismatch": [
                {"name": d["name"], "a": d["checkpoint"], "b": d["target"]}
                for d in before["shape_mismatch"]
            ],
            "dtype_mismatch": [
                {"name": d["name"], "a": d["checkpoint"], "b": d["target"]}
                for d in before["dtype_mismatch"]
            ],
            "findings": [
                {"kind": f.kind, "summary": f.summary, "keys": f.keys, "rule": f.rule}
                for f in self.inference.findings
            ],
            "unresolved": [
                {"names": u.names, "reason": u.reason} for u in self.inference.unresolved
            ],
            "reconciled": self.reconciled,
            "remaining": self.remaining(),
            "check_with_rules": self.after.to_dict() if self.after else None,
        }

    def text(self) -> list[str]:
        """The human form: the two sides, the differences explained, the raw lists."""
        b = self.before
        lines = [
            f"A: {self.source.path} ({self.source.format}, {len(self.source.tensors)} tensors"
            + (f", container {self.source.container!r}" if self.source.container else "")
            + ")",
            f"B: {self.target.description} ({len(self.target.expected)} tensors)",
        ]
        if self.identical:
            lines.append("identical: the same names, shapes and dtypes")
            return lines
        common = len(self.target.expected) - len(b.missing) - len(b.filled) - len(b.tied)
        lines.append(
            f"by name: {common} in common, {len(b.unexpected)} only in A, {len(b.missing)} "
            f"only in B, {len(b.shape)} shapes and {len(b.dtype)} dtypes differ"
        )
        if b.tied:
            lines.append(
                f"tied in B, absent from A ({len(b.tied)}): "
                + ", ".join(f"{n} (shares {p})" for n, p in b.tied)
                + "; nothing to do: the model fills them from the shared tensor"
            )
        if self.inference.findings:
            lines.append("differences:")
            lines += [f"  - {f.line if f.rule else f.summary}" for f in self.inference.findings]
        if b.unexpected:
            lines.append(f"only in A ({len(b.unexpected)}): {group_names(b.unexpected)}")
        if b.missing:
            lines.append(f"only in B ({len(b.missing)}): {group_names(b.missing)}")
        for name, got, want in b.shape[:SHOWN]:
            lines.append(f"shape: {name}: A {list(got)}, B {list(want)}")
        if len(b.shape) > SHOWN:
            lines.append(f"... and {len(b.shape) - SHOWN} more shape differences")
        if self.reconciled:
            lines.append(
                f"reconcilable: `diff --suggest` prints "
                f"{plural(len(self.rules.rules), 'rule')} with which A loads strictly into B "
                "(verified)"
            )
        else:
            lines.append("not reconcilable by suggested rules alone:")
            lines += [f"  {line}" for line in _shorten(self.remaining())]
        return lines


def compare(source: Checkpoint, target: TargetInfo) -> DiffReport:
    """Compare ``source`` with ``target``, infer the rules, and verify them by running them."""
    before = check_table(source.tensors, target)
    inference = infer_rules(source.tensors, target)
    rules = parse_rules(inference.rules, "<suggested rules>")
    try:
        table, _ = run_rules(rules, source.tensors, target)
    except FitError as exc:
        return DiffReport(source, target, before, inference, rules, None, str(exc))
    return DiffReport(source, target, before, inference, rules, check_table(table, target))


def _shorten(lines: list[str]) -> list[str]:
    if len(lines) <= SHOWN:
        return lines
    return [*lines[:SHOWN], f"... and {len(lines) - SHOWN} more"]
