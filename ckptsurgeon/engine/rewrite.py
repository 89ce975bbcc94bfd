"""Running a rules file's ops over a lazy table: the one step that planning
(:mod:`~ckptsurgeon.engine.plan`) and verification (:mod:`~ckptsurgeon.engine.verify`) both
take. It lives apart from both so that neither imports the other: the plan's report holds a
verification, and verification reruns the rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ckptsurgeon.rules.ops import Context

if TYPE_CHECKING:
    from ckptsurgeon.formats.table import Table
    from ckptsurgeon.rules.document import RulesFile
    from ckptsurgeon.targets.spec import TargetInfo


def run_rules(
    rules: RulesFile,
    table: Table,
    target: TargetInfo | None,
    base_dir: str = "",
    sources: Mapping[str, Table] | None = None,
) -> tuple[Table, dict[str, str]]:
    """Run every rule in order; returns the new table and the dropped keys (with reasons).
    Relative paths in ops (a merge_lora adapter) resolve against ``base_dir`` (default: the
    working directory); ``sources`` are the named sources take and average read (none for
    rules given without a file)."""
    ctx = Context(seed=rules.seed, target=target, base_dir=base_dir, sources=sources or {})
    for i, op in enumerate(rules.rules):
        ctx.where = f"rules[{i}] ({op.op})"
        table = op.run(table, ctx)
    return table, ctx.dropped
