"""Planning: run every rule over the lazy table and check the result, reading no tensor data.

A :class:`Plan` is everything ``apply`` knows before it writes: each output key with its
source keys, shape, dtype and history, what was dropped and why, and the target check.
Nothing is written unless the whole plan is valid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from ckptsurgeon.engine.report import ApplyReport, KeyEntry, SourceInfo
from ckptsurgeon.engine.rewrite import run_rules
from ckptsurgeon.engine.sources import OpenedSources
from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.reader import Checkpoint, open_checkpoint
from ckptsurgeon.formats.table import Table, cast_floating, dtype_name, parse_dtype
from ckptsurgeon.rules.config import SourceSpec
from ckptsurgeon.rules.document import NamedSource, RulesFile
from ckptsurgeon.targets.check import CheckResult, check_table
from ckptsurgeon.targets.spec import TargetInfo, resolve_target


@dataclass
class Plan:
    source: Checkpoint
    table: Table
    dropped: dict[str, str]
    target: TargetInfo | None
    check: CheckResult | None
    output: str | None

    def entries(self) -> list[KeyEntry]:
        return [
            KeyEntry(
                name=name,
                sources=ref.sources,
                shape=ref.shape,
                dtype=dtype_name(ref.dtype),
                actions=ref.actions,
                bytes=ref.nbytes,
            )
            for name, ref in self.table.items()
        ]

    def counts(self) -> dict[str, int]:
        verbs: Counter[str] = Counter()
        for ref in self.table.values():
            for verb in {a.verb for a in ref.actions} or {"kept"}:
                verbs[verb] += 1
        verbs["dropped"] = len(self.dropped)
        verbs["output keys"] = len(self.table)
        verbs["source keys"] = len(self.source.tensors)
        return dict(verbs)

    def report(self, *, dry_run: bool) -> ApplyReport:
        src = self.source
        return ApplyReport(
            source=SourceInfo(src.path, src.format, src.container, src.note),
            target=self.target.description if self.target else None,
            output=self.output,
            dry_run=dry_run,
            keys=self.entries(),
            dropped=dict(self.dropped),
            counts=self.counts(),
            total_bytes=sum(r.nbytes for r in self.table.values()),
            check=self.check,
        )


def _target_order(table: Table, target: TargetInfo | None) -> Table:
    """The target's key order first (as its state_dict lists them), then anything else."""
    if target is None:
        return table
    ordered = {n: table[n] for n in target.expected if n in table}
    ordered.update({n: r for n, r in table.items() if n not in ordered})
    return ordered


def make_plan(
    rules: RulesFile,
    base_dir: str,
    source: SourceSpec,
    output: str | None,
    sources: Mapping[str, NamedSource] | None = None,
) -> Plan:
    """Open ``source`` (its path already resolved), run the rules, apply the output dtype,
    and check against the target; ``output`` is the resolved output path, if any.
    ``sources`` are the named sources (paths resolved), each opened when an op first
    reads it.

    The source's ``allow_globals`` name trusted classes, not one file: a reference-checkpoint
    target admits them too, as in ``check`` and ``diff``.
    """
    ckpt = open_checkpoint(source.path, source.key, source.allow_globals)
    target_spec = rules.target
    if target_spec is not None and target_spec.checkpoint and source.allow_globals:
        merged = [*target_spec.allow_globals, *source.allow_globals]
        target_spec = target_spec.model_copy(update={"allow_globals": merged})
    target = resolve_target(target_spec, base_dir) if target_spec else None

    named = OpenedSources(sources or {}, main=(source, ckpt))
    table, dropped = run_rules(rules, ckpt.tensors, target, base_dir, named)
    out_spec = rules.output_spec
    if out_spec.dtype:
        table = cast_floating(table, parse_dtype(out_spec.dtype))
    table = _target_order(table, target)
    check = (
        check_table(table, target, rules.check.allow_missing, rules.check.allow_unexpected)
        if target
        else None
    )
    return Plan(ckpt, table, dropped, target, check, output)


class PlanFailed(FitError):
    """A plan that does not fit its target; carries the report for --json and --report."""

    def __init__(self, message: str, report: ApplyReport) -> None:
        super().__init__(message)
        self.report = report
