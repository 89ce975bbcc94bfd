"""One command's work as a value: a rules document, the folder its paths resolve against,
how to read the source, and the steps of ``apply``: up-to-date check -> plan -> check ->
write (-> verify, before the output is moved into place) -> report -> fine-tune.

The CLI and the Python API both build a :class:`Job` and run it, so the rules file is read
once and every option lives in one place instead of being passed down through each layer.
What the steps have to show (the plan table, progress, fine-tune lines) goes to a
:class:`Reporter` the caller passes: the CLI's prints, the API's default logs.
The job sits above the engine and the fine-tune runner because it is the one place that
sequences them; neither of them imports it.

This module imports no torch at import time: ``apply --skip-up-to-date`` answers from
headers and file status alone, and the source is hashed in the background before torch is
loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ckptsurgeon import logs
from ckptsurgeon.engine.ranks import launch, on_rank_zero
from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats.hub import local_path
from ckptsurgeon.logs import Log
from ckptsurgeon.paths import resolve, rules_folder, within
from ckptsurgeon.results import ApplyResult
from ckptsurgeon.rules.config import SourceSpec
from ckptsurgeon.rules.document import NamedSource, RulesFile, load_rules, parse_document

if TYPE_CHECKING:
    from ckptsurgeon.engine.plan import Plan
    from ckptsurgeon.engine.report import ApplyReport
    from ckptsurgeon.engine.verify import VerifyResult
    from ckptsurgeon.formats.writer import Progress
    from ckptsurgeon.rules.finetune import FinetuneSpec


class Reporter(Protocol):
    """What an ``apply`` shows while it runs, on rank 0 (``log``: on every rank that
    fine-tunes; the runner keeps the other ranks quiet)."""

    def log(self, message: str) -> None:
        """A line of the fine-tune's progress."""

    def up_to_date(self, output: str | None) -> None:
        """The output was made from the same inputs and rules: nothing runs."""

    def planned(self, report: ApplyReport) -> None:
        """The plan, once it is checked and written (or, in a dry run, would be)."""

    def finetune_plan(self, plan: dict[str, Any]) -> None:
        """A dry run's account of what the ``finetune:`` section would train."""


class QuietReporter:
    """The API's reporter: fine-tune lines and the up-to-date verdict go to the
    ``ckptsurgeon`` logger; the plan is in the returned report, so it is not shown."""

    def log(self, message: str) -> None:
        logs.info(message)

    def up_to_date(self, output: str | None) -> None:
        logs.info(f"up to date: {output} was made from the same inputs and rules")

    def planned(self, report: ApplyReport) -> None:
        pass

    def finetune_plan(self, plan: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class ReadOptions:
    """How to read checkpoints: the nested container (``--key``) and the pickle classes to
    admit (``--allow-global``), given on the command line or to the API."""

    key: str | None = None
    allow_globals: tuple[str, ...] = ()


@dataclass(frozen=True)
class WriteOptions:
    """How to write the output: progress, and durability. One value from the caller down
    to the writer (digests of the source computed ahead are found by the writer itself:
    see :func:`hashing_ahead`)."""

    progress: Progress | None = None
    durable: bool = True


@contextlib.contextmanager
def running(progress: Progress | None) -> Iterator[Progress | None]:
    """``progress`` for the duration of one write: a progress that is also a context
    manager (a bar) is entered here and left when the write ends, so that the bar is off
    the screen before anything else is shown."""
    if progress is not None and hasattr(progress, "__enter__") and hasattr(progress, "__exit__"):
        with progress:  # type: ignore[attr-defined]  # checked just above
            yield progress
    else:
        yield progress


@contextlib.contextmanager
def hashing_ahead(source: str | None) -> Iterator[None]:
    """Hash a safetensors ``source``'s tensors in the background while the block runs.

    Entered before torch is imported, so the hashing takes the core that import leaves
    idle, and copies made in the block need not hash: the writer finds these digests by
    the file's identity (see :mod:`ckptsurgeon.formats.prehash`). Nothing happens for a
    ``source`` of None or one that is not safetensors.
    """
    from ckptsurgeon.formats.prehash import SourceDigests

    digests = SourceDigests.start(local_path(source)) if source is not None else None
    try:
        yield
    finally:
        if digests is not None:
            digests.stop()


def write_report(path: str, report: Mapping[str, Any]) -> None:
    """Write ``report`` as JSON to ``path``: a regular file is replaced atomically; a pipe,
    a link or /dev/stdout is written through, as a shell redirection would."""
    from ckptsurgeon.errors import OutputError
    from ckptsurgeon.formats.atomic import atomic_path

    atomic = not os.path.lexists(path) or (os.path.isfile(path) and not os.path.islink(path))
    place = atomic_path(path, is_dir=False, durable=False) if atomic else None
    try:
        with (
            place or contextlib.nullcontext(path) as tmp,
            open(tmp, "w", encoding="utf-8") as f,
        ):
            json.dump(dict(report), f, indent=2)
            f.write("\n")
    except OSError as exc:
        raise OutputError(f"writing the report {path} failed: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Job:
    """A parsed rules document and everything needed to run it.

    ``source`` and ``output`` override the document's (relative to the working directory,
    as the CLI's ``--source``/``--output``). A ``source`` given here replaces the whole
    ``source:`` entry, its ``key`` and ``allow_globals`` included (they describe that
    other file); ``read`` applies either way.
    """

    document: RulesFile
    base_dir: str
    rules_path: str | None = None
    source: str | None = None
    output: str | None = None
    read: ReadOptions = ReadOptions()

    @classmethod
    def from_file(
        cls,
        rules_path: str | os.PathLike,
        *,
        source: str | None = None,
        output: str | None = None,
        read: ReadOptions = ReadOptions(),
    ) -> Job:
        """Read and validate the rules file; its relative paths resolve against its folder."""
        rules_path = os.fspath(rules_path)
        return cls(
            load_rules(rules_path), rules_folder(rules_path), rules_path, source, output, read
        )

    @classmethod
    def from_mapping(
        cls,
        document: Mapping[str, Any],
        *,
        base_dir: str | None = None,
        source: str | None = None,
        output: str | None = None,
        read: ReadOptions = ReadOptions(),
    ) -> Job:
        """A rules document given as Python data; its paths resolve against ``base_dir``
        (default: the working directory)."""
        rules = parse_document(dict(document))
        return cls(rules, base_dir or os.getcwd(), None, source, output, read)

    # -- what the job reads and writes ------------------------------------------------

    def source_spec(self) -> SourceSpec:
        """The source to read, its path resolved; UsageError when neither the document nor
        the caller names one."""
        if self.source is not None:
            return SourceSpec(
                path=self.source, key=self.read.key, allow_globals=list(self.read.allow_globals)
            )
        spec = self.document.source_spec
        if spec is None:
            raise UsageError("no source: give source: in the rules file, or a source path")
        return SourceSpec(
            path=resolve(spec.path, self.base_dir),
            key=self.read.key if self.read.key is not None else spec.key,
            allow_globals=[*spec.allow_globals, *self.read.allow_globals],
        )

    @property
    def source_path(self) -> str | None:
        """The source's path, or None when there is none (``run`` then says so)."""
        try:
            return self.source_spec().path
        except UsageError:
            return None

    @property
    def output_path(self) -> str | None:
        if self.output is not None:
            return self.output
        path = self.document.output_spec.path
        return resolve(path, self.base_dir) if path else None

    def _target_files(self) -> list[str]:
        """The reference checkpoint or manifest a target names."""
        target = self.document.target
        named = [p for p in (target.checkpoint, target.manifest) if p] if target else []
        return [resolve(p, self.base_dir) for p in named]

    def named_sources(self) -> dict[str, NamedSource]:
        """The document's ``sources:``, each path resolved as ``source:``'s is (against
        the rules file's folder; ``hf://`` names kept); ``--allow-global`` classes are
        admitted in each, ``--key`` (the source's container) in none."""
        return {
            name: spec.model_copy(
                update={
                    "path": resolve(spec.path, self.base_dir),
                    "allow_globals": [*spec.allow_globals, *self.read.allow_globals],
                }
            )
            for name, spec in self.document.named_sources().items()
        }

    def _source_files(self) -> list[str]:
        """The named sources' files or folders (hf:// names: their cache snapshots)."""
        return [local_path(spec.path) for spec in self.named_sources().values()]

    def _op_inputs(self) -> list[str]:
        """What the rules' ops read besides the source (a merge_lora adapter folder)."""
        return [f for op in self.document.rules for f in op.input_files(self.base_dir)]

    def _fixed_inputs(self) -> list[str]:
        """The rules file, the target's and the ops' files: inputs the output must never
        replace."""
        files = [*self._target_files(), *self._source_files(), *self._op_inputs()]
        return [self.rules_path, *files] if self.rules_path else files

    def record(self) -> str:
        """What an output made by this job records about its inputs (see
        :mod:`ckptsurgeon.engine.uptodate`): the document as validated, the source as read
        (overrides included), and the identity of every input file."""
        from ckptsurgeon.engine.uptodate import make_record

        source = self.source_spec()
        # Not the output path: the same inputs make the same bytes wherever they go.
        document = {
            "document": self.document.model_dump(mode="json"),
            "source": source.model_dump(mode="json"),
        }
        files = [local_path(f) for f in self.input_paths()]  # hf:// names: their snapshots
        return make_record(document, [f for f in files if os.path.exists(f)])

    def input_paths(self) -> list[str]:
        """Every file or folder the job reads, the source first: what the up-to-date
        record lists, so a change to any of them makes the output stale. A new kind of
        input is added here (ops declare theirs with ``Op.input_files``)."""
        return [
            self.source_spec().path,
            *self._target_files(),
            *self._source_files(),
            *self._op_inputs(),
            *self._code_inputs(),
        ]

    def _code_inputs(self) -> list[str]:
        """Model files (``file.py:callable``) and recorded inputs the job runs or reads."""
        names = []
        if self.document.target and self.document.target.model:
            names.append(self.document.target.model)
        verify = self.document.verify
        if verify is not None:
            names.append(verify.reference.model)
        paths = [resolve(n.rpartition(":")[0], self.base_dir) for n in names if ".py:" in n]
        if verify is not None and verify.file:
            paths.append(resolve(verify.file, self.base_dir))
        return paths

    def up_to_date(self) -> bool:
        """Does the output exist, made by this version from the same inputs and rules?"""
        from ckptsurgeon.engine.uptodate import is_up_to_date

        return is_up_to_date(self.output_path, self.record())

    # -- the steps ----------------------------------------------------------------------

    def plan(self) -> Plan:
        """Open the source, run the rules and check the result; nothing is written."""
        from ckptsurgeon.engine.plan import make_plan

        return make_plan(
            self.document,
            self.base_dir,
            self.source_spec(),
            self.output_path,
            self.named_sources(),
        )

    def run(
        self,
        *,
        dry_run: bool = False,
        finetune: bool = True,
        skip_up_to_date: bool = False,
        write: WriteOptions = WriteOptions(),
        report_path: str | None = None,
        reporter: Reporter | None = None,
    ) -> ApplyResult:
        """The whole ``apply``: unless the output is up to date (asked with
        ``skip_up_to_date``), plan, check, write (unless ``dry_run``), then fine-tune when
        the document has a ``finetune:`` section and ``finetune`` is true (a dry run
        reports what it would train instead); the report is also written to
        ``report_path``. Returns the result; ``reporter`` (default: log) is told what to
        show as the steps go.

        Raises PlanFailed (exit 1) when the result does not fit the target, VerifyFailed
        (exit 4) when it does not compute what the source computed; nothing is written but
        the report, which each carries as ``.report``. ``report_path`` is refused, as the
        output is, when it would overwrite an input or the output, or has no folder.

        Under torchrun rank 0 checks, plans and writes while the other ranks wait; then
        every rank holds rank 0's result and fine-tunes, and rank 0 writes the report (see
        :mod:`ckptsurgeon.engine.ranks`).
        """
        reporter = QuietReporter() if reporter is None else reporter
        result = self._apply_on_rank_zero(
            dry_run=dry_run,
            skip_up_to_date=skip_up_to_date,
            write=write,
            report_path=report_path,
            reporter=reporter,
        )
        report = result.report
        main = launch().main
        if report is not None and finetune and self.document.finetune is not None:
            if report.written is not None:
                report.finetune = self.finetune(
                    weights=report.written.path, read=ReadOptions(), log=reporter.log
                )
            elif dry_run and main:
                report.finetune_plan = self.finetune_plan()
                reporter.finetune_plan(report.finetune_plan)
        if report_path is not None and main:
            write_report(report_path, result.to_dict())
        return result

    @on_rank_zero
    def _apply_on_rank_zero(
        self,
        *,
        dry_run: bool,
        skip_up_to_date: bool,
        write: WriteOptions,
        report_path: str | None,
        reporter: Reporter,
    ) -> ApplyResult:
        """:meth:`run` up to the fine-tune, on rank 0 (the others receive its result); the
        one rank-0 gate of an ``apply``."""
        if skip_up_to_date and not dry_run and self.up_to_date():  # headers and stat: no torch
            reporter.up_to_date(self.output_path)
            return ApplyResult(self.output_path)
        # Hashing starts before the imports below load torch (see hashing_ahead).
        with hashing_ahead(None if dry_run else self.source_path):
            from ckptsurgeon.engine.plan import PlanFailed
            from ckptsurgeon.engine.verify import VerifyFailed

            try:
                with running(write.progress):
                    report = self._write(dry_run=dry_run, write=write, report_path=report_path)
            except (PlanFailed, VerifyFailed) as exc:
                if report_path is not None and exc.report is not None:
                    write_report(report_path, exc.report.to_dict())
                raise
        if skip_up_to_date:
            report.up_to_date = False
        reporter.planned(report)
        return ApplyResult(report.output, report)

    def _write(self, *, dry_run: bool, write: WriteOptions, report_path: str | None) -> ApplyReport:
        """Plan, check and write (unless ``dry_run``): the report."""
        from ckptsurgeon.engine.plan import PlanFailed
        from ckptsurgeon.engine.report import Written
        from ckptsurgeon.engine.uptodate import RECORD_KEY
        from ckptsurgeon.formats.atomic import refuse_overwriting_inputs
        from ckptsurgeon.formats.writer import check_output, provenance, write_checkpoint

        started = time.perf_counter()
        plan = self.plan()
        planned = time.perf_counter()
        inputs = [local_path(plan.source.path), *plan.source.files, *self._fixed_inputs()]
        if report_path is not None:
            _check_report_path(report_path, inputs, plan.output)
        report = plan.report(dry_run=dry_run)
        if plan.check is not None and not plan.check.ok:
            raise PlanFailed(
                f"the result does not load strictly into {plan.check.target}; nothing was "
                "written\n  " + "\n  ".join(plan.check.lines()),
                report,
            )
        spec = self.document.output_spec
        if plan.output is not None:  # what the write would refuse, a dry run refuses too
            check_output(plan.output, spec.max_shard_size, plan.table.keys(), spec.format)
            refuse_overwriting_inputs(plan.output, inputs)
        if dry_run:
            return report
        if plan.output is None:
            raise UsageError("no output: give output.path in the rules file, or an output path")
        durable = spec.fsync and write.durable
        record = self.record()  # the inputs as they are before their data is read
        extras = self._extras(plan)
        carried: list[str] = []

        def before_commit(written: str) -> None:
            """Complete the temporary output, then prove it, before it is moved into place."""
            from ckptsurgeon.engine.verify import raise_if_failed

            if extras is not None:
                carried.extend(self._complete_folder(plan, written, extras, durable))
            if self.document.verify is not None:
                report.verify = self._verify(plan, written)
                raise_if_failed(report.verify, report)

        result = write_checkpoint(
            plan.table,
            plan.output,
            max_shard_size=spec.max_shard_size,
            metadata=provenance(plan.source.path, {RECORD_KEY: record}),
            progress=write.progress,
            durable=durable,
            before_commit=before_commit,
            format=spec.format,
        )
        files = [*result.files, *(os.path.join(result.path, name) for name in carried)]
        report.written = Written(result.path, files, result.total_bytes, durable)
        # The work itself, without interpreter start-up and imports (benchmarks compare it).
        report.seconds = {
            "plan": round(planned - started, 4),
            "write": round(time.perf_counter() - planned, 4),
        }
        return report

    def _extras(self, plan: Plan) -> list[str] | None:
        """The source folder's config, tokenizer and preprocessor files a folder output
        carries along (``output.copy_extras``); None when the output is not a folder or
        the document turns it off. Checked here, before anything is written."""
        from ckptsurgeon.formats.hf_folder import extras_in
        from ckptsurgeon.formats.kinds import output_kind

        if plan.output is None or not self.document.output_spec.copy_extras:
            return None
        if output_kind(plan.output, self.document.output_spec.format) != "folder":
            return None
        source = plan.source
        folder = local_path(source.path)  # an hf:// name: its cache snapshot
        return extras_in(folder) if os.path.isdir(folder) else []

    def _complete_folder(
        self, plan: Plan, written: str, extras: list[str], durable: bool
    ) -> list[str]:
        """Copy ``extras`` into the temporary folder ``written`` and, for a transformers
        target, write the target's own config.json; returns the names added."""
        from ckptsurgeon.formats.hf_folder import CONFIG, copy_extras, write_model_config
        from ckptsurgeon.formats.table import dtype_name

        names = copy_extras(extras, written, durable)
        model = plan.target.model if plan.target is not None else None
        floats = [r.dtype for r in plan.table.values() if r.dtype.is_floating_point]
        dtype = dtype_name(floats[0]) if floats else None
        if model is not None and write_model_config(model, written, dtype):
            names = [*dict.fromkeys([*names, CONFIG])]
        return names

    def verify(self) -> VerifyResult:
        """Verify the output already written (``ckptsurgeon verify``): does it compute what
        the source computed? UsageError when there is no ``verify:`` section or no output."""
        if self.document.verify is None:
            raise UsageError("this file has no verify: section")
        plan = self.plan()
        if plan.output is None or not os.path.exists(plan.output):
            raise UsageError(
                f"no output at {plan.output} to verify: run apply first, or give the output path"
                if plan.output
                else "no output: give output.path in the rules file, or an output path"
            )
        return self._verify(plan, plan.output)

    def _verify(self, plan: Plan, result: str) -> VerifyResult:
        """Verify the checkpoint written at ``result`` (read back: what the disk holds)."""
        from ckptsurgeon.engine.verify import verify
        from ckptsurgeon.formats.reader import open_checkpoint

        spec, target = self.document.verify, self.document.target
        assert spec is not None and target is not None  # checked when the file was read
        return verify(
            spec,
            seed=self.document.seed,
            base_dir=self.base_dir,
            source=self.source_spec(),
            target=target,
            result=open_checkpoint(result).tensors,
            result_plan=plan.table,
        )

    def finetune(
        self,
        *,
        weights: str | None = None,
        read: ReadOptions | None = None,
        resume: bool = False,
        log: Log = logs.info,
    ) -> dict[str, Any]:
        """Build the model the ``finetune:`` section names, load its weights, and train it.

        ``weights`` defaults to ``finetune.weights``, then to the document's output; they
        are read with ``read`` (default: this job's options; the output ``run`` has just
        written is plain safetensors and needs none).
        """
        read = self.read if read is None else read
        from ckptsurgeon.engine.load import load_into
        from ckptsurgeon.finetune.runner import run_finetune
        from ckptsurgeon.targets.models import build_model

        spec, model_spec, kwargs = self._finetune_model()
        if weights is None and spec.weights:
            weights = resolve(spec.weights, self.base_dir)
        if weights is None:
            path = self.document.output_spec.path
            weights = resolve(path, self.base_dir) if path else None
        if not launch().main:  # under torchrun every rank trains; rank 0 alone reports
            log = logs.quiet
        model = build_model(model_spec, kwargs, self.base_dir, device="cpu")
        if weights is not None:
            if not os.path.exists(weights):
                raise UsageError(
                    f"finetune weights {weights} do not exist (run apply first, or set "
                    "finetune.weights)"
                )
            load_into(model, weights, key=read.key, allow_globals=read.allow_globals)
            log(f"fine-tuning {model_spec} from {weights}")
        else:
            log(f"fine-tuning {model_spec} from its own initialisation (no weights given)")
        return run_finetune(
            spec,
            model,
            base_dir=self.base_dir,
            resume=resume,
            log=log,
            source=weights or model_spec,
            fresh=lambda: build_model(model_spec, kwargs, self.base_dir, device="cpu"),
        )

    def _finetune_model(self) -> tuple[FinetuneSpec, str, dict[str, Any]]:
        """The ``finetune:`` section, and the model (spec, kwargs) it trains."""
        spec = self.document.finetune
        if spec is None:
            raise UsageError("this file has no finetune: section")
        target = self.document.target
        model_spec = spec.model or (target.model if target else None)
        if not model_spec:
            raise UsageError("finetune.model is not set and there is no target.model to default to")
        kwargs = (
            spec.kwargs
            if spec.kwargs is not None
            else (target.kwargs if target and target.model == model_spec else {})
        )
        return spec, model_spec, kwargs

    def finetune_plan(self) -> dict[str, Any]:
        """What the ``finetune:`` section will train, without training (``--dry-run``): its
        freeze and phases, or the expansion of its ``strategy:`` on the model (built with
        its own initialisation; the layout needs no weights)."""
        from ckptsurgeon.finetune.strategy import plan
        from ckptsurgeon.targets.models import build_model

        spec, model_spec, kwargs = self._finetune_model()
        return plan(spec, build_model(model_spec, kwargs, self.base_dir, device="cpu"))


def _check_report_path(report_path: str, inputs: list[str], output: str | None) -> None:
    """Refuse, before anything is written, a report that would land on an input or on the
    output, or in a folder that does not exist (the write would fail after the output)."""
    from ckptsurgeon.formats.atomic import refuse_overwriting_inputs

    refuse_overwriting_inputs(report_path, inputs, what="the report")
    if output is not None and within(os.path.realpath(report_path), os.path.realpath(output)):
        raise UsageError(f"the report {report_path} would overwrite the output {output}")
    folder = os.path.dirname(os.path.abspath(report_path))
    if not os.path.isdir(folder):
        raise UsageError(f"the report {report_path}: no folder {folder}")
    if os.path.isdir(report_path):
        raise UsageError(f"the report {report_path} is a folder; give a file path")
