"""``apply``: plan, check, then stream the result to its output atomically."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from ckptsurgeon.engine.plan import PlanFailed, make_plan
from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats.prehash import SourceDigests
from ckptsurgeon.formats.writer import (
    Progress,
    check_output,
    provenance,
    refuse_overwriting_inputs,
    write_checkpoint,
)
from ckptsurgeon.paths import resolve, rules_folder, within
from ckptsurgeon.rules.document import RulesFile, load_rules


def apply_rules(
    rules: RulesFile,
    base_dir: str,
    *,
    source: str | None = None,
    output: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    finetune: bool = True,
    durable: bool = True,
    log=print,
    report_path: str | None = None,
    prehashed: SourceDigests | None = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> dict[str, Any]:
    """Plan, check and (unless ``dry_run``) write, then run the ``finetune:`` section if the
    file has one and ``finetune`` is true; returns the report.

    Raises PlanFailed (exit 1) when the result does not fit the target; nothing is written.
    ``report_path`` (where the caller will write the report) is refused, like the output,
    when it would overwrite an input or the output, or has no folder to go to.
    ``prehashed``: see :func:`write_checkpoint`; ``key``, ``allow_globals``: see
    :func:`make_plan`.
    """
    started = time.perf_counter()
    plan = make_plan(
        rules, base_dir, source=source, output=output, key=key, allow_globals=allow_globals
    )
    planned = time.perf_counter()
    inputs = [plan.source.path, *plan.source.files, *_target_files(rules, base_dir)]
    if report_path is not None:
        _check_report_path(report_path, inputs, plan.output)
    report = plan.report(dry_run=dry_run)
    if plan.check is not None and not plan.check.ok:
        raise PlanFailed(
            f"the result does not load strictly into {plan.check.target}; nothing was written\n  "
            + "\n  ".join(plan.check.lines()),
            report,
        )
    spec = rules.output_spec
    if plan.output is not None:  # what the write would refuse, a dry run refuses too
        check_output(plan.output, spec.max_shard_size, plan.table.keys())
        refuse_overwriting_inputs(plan.output, inputs)
    if dry_run:
        return report
    if plan.output is None:
        raise UsageError("no output: give output.path in the rules file or --output")
    result = write_checkpoint(
        plan.table,
        plan.output,
        max_shard_size=spec.max_shard_size,
        metadata=provenance(plan.source.path),
        progress=progress,
        durable=spec.fsync and durable,
        prehashed=prehashed,
    )
    report["written"] = {
        "path": result.path,
        "files": result.files,
        "bytes": result.total_bytes,
        "durable": spec.fsync and durable,
    }
    # The work itself, without interpreter start-up and imports (benchmarks compare it).
    report["seconds"] = {
        "plan": round(planned - started, 4),
        "write": round(time.perf_counter() - planned, 4),
    }
    if finetune and rules.finetune is not None:
        from ckptsurgeon.finetune import finetune_from_rules

        report["finetune"] = finetune_from_rules(rules, base_dir, weights=result.path, log=log)
    return report


def _check_report_path(report_path: str, inputs: list[str], output: str | None) -> None:
    """Refuse, before anything is written, a report that would land on an input or on the
    output, or in a folder that does not exist (the write would fail after the output)."""
    refuse_overwriting_inputs(report_path, inputs, what="--report")
    if output is not None and within(os.path.realpath(report_path), os.path.realpath(output)):
        raise UsageError(f"--report {report_path} would overwrite the output {output}")
    folder = os.path.dirname(os.path.abspath(report_path))
    if not os.path.isdir(folder):
        raise UsageError(f"--report {report_path}: no folder {folder}")
    if os.path.isdir(report_path):
        raise UsageError(f"--report {report_path} is a folder; give a file path")


def _target_files(rules: RulesFile, base_dir: str) -> list[str]:
    """The reference checkpoint or manifest a target names: inputs too."""
    target = rules.target
    paths = [p for p in (target.checkpoint, target.manifest) if p] if target else []
    return [resolve(p, base_dir) for p in paths]


def apply_file(
    rules_path: str | os.PathLike,
    *,
    source: str | None = None,
    output: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    finetune: bool = True,
    durable: bool = True,
    log=print,
    report_path: str | None = None,
    prehashed: SourceDigests | None = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> dict[str, Any]:
    """``ckptsurgeon apply RULES.yaml``: paths in the file resolve against its folder."""
    rules_path = os.fspath(rules_path)
    if report_path is not None:
        refuse_overwriting_inputs(report_path, [rules_path], what="--report")
    rules = load_rules(rules_path)
    base_dir = rules_folder(rules_path)
    return apply_rules(
        rules,
        base_dir,
        source=source,
        output=output,
        dry_run=dry_run,
        progress=progress,
        finetune=finetune,
        durable=durable,
        log=log,
        report_path=report_path,
        prehashed=prehashed,
        key=key,
        allow_globals=allow_globals,
    )
