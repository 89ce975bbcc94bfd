"""Every ``ckptsurgeon`` command as a function: ``inspect``, ``check``, ``diff``, ``convert``,
``validate``, ``verify``, ``finetune`` and ``apply`` take the command's options as arguments
and return a value whose ``to_dict()`` is what the command prints with ``--json`` (see
:mod:`ckptsurgeon.results`). The CLI parses flags, calls these, and prints; the Python API
(:mod:`ckptsurgeon.api`) exports them.

This module imports no torch at import time, and each function imports what it needs when
it runs: ``inspect`` of safetensors reads headers alone, ``validate`` loads nothing, and
``apply`` of an up-to-date output answers from headers and file status, all without torch.
Errors name arguments, not command-line flags: the API has no flags.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ckptsurgeon.engine.ranks import on_rank_zero
from ckptsurgeon.errors import InputError, UsageError
from ckptsurgeon.results import (
    ApplyResult,
    ConvertResult,
    DiffResult,
    FinetuneResult,
    InspectResult,
    ValidateResult,
    VerifyReport,
)

if TYPE_CHECKING:
    from ckptsurgeon.formats.writer import Progress
    from ckptsurgeon.job import Reporter
    from ckptsurgeon.targets.check import CheckResult

__all__ = ["apply", "check", "convert", "diff", "finetune", "inspect", "validate", "verify"]

Kwargs = Mapping[str, Any] | str | None  # keyword arguments for a model: a mapping, or JSON


def _kwargs(kwargs: Kwargs, name: str = "kwargs") -> dict[str, Any]:
    """Model keyword arguments as a dict; JSON text that is not an object is a UsageError
    naming the argument, raised before anything heavy is imported."""
    if not isinstance(kwargs, str):
        return dict(kwargs or {})
    try:
        obj = json.loads(kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name}: not valid JSON ({exc.msg} at character {exc.pos + 1})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{name}: expected a JSON object, not {type(obj).__name__}")
    return obj


# torch's dtypes that are not floating point, by name (quantized, complex, narrow
# integers, and the aliases torch also answers to).
_NOT_FLOATING = re.compile(
    r"q?u?int\d+|quint\d+x\d+|complex\d+|c(half|float|double)|long|int|short|bits\w+"
)


def _check_dtype_name(dtype: str) -> None:
    """What can be told of a ``convert`` dtype without torch: a UsageError for a known
    non-floating dtype or a name that is no dtype at all (exotic float names are left for
    torch to judge)."""
    from ckptsurgeon.formats.checkpoint import did_you_mean
    from ckptsurgeon.formats.dtypes import FLOAT_DTYPES, KNOWN_NAMES, OTHER_DTYPES, canonical_dtype

    name = canonical_dtype(dtype)
    if name in FLOAT_DTYPES or re.fullmatch(r"b?float\d+(_\w+)?", name):
        return  # a float8 or float4 variant: whether it is one, the torch installed says
    if name in OTHER_DTYPES or _NOT_FLOATING.fullmatch(name):
        raise UsageError(
            f"dtype {dtype}: converting casts every floating tensor, so it takes a "
            "floating-point dtype (bfloat16, float16, float32, ...)"
        )
    hint = did_you_mean(dtype.lower(), KNOWN_NAMES) or f"one of {', '.join(KNOWN_NAMES)}"
    raise UsageError(f"dtype: unknown dtype {dtype!r}; {hint}")


def _progress(progress: bool | Progress | None, label: str) -> Progress | None:
    """``True``: a bar on stderr (shown when stderr is a terminal); a progress object: that
    one; ``False``/None: none."""
    if progress is True:
        from ckptsurgeon.reporting.progress import ByteProgress

        return ByteProgress(label)
    return progress or None


def inspect(
    path: str | os.PathLike,
    *,
    pattern: str | None = None,
    verify: bool = False,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> InspectResult:
    """Tensors, shapes, dtypes, bytes, parameter count, container keys and format of a
    checkpoint (names matching the regular expression ``pattern`` only); with ``verify``,
    recorded checksums are recomputed (InputError, exit 3, naming what is corrupt)."""
    from ckptsurgeon.formats.header_table import open_header_checkpoint
    from ckptsurgeon.reporting import inspect as report
    from ckptsurgeon.rules.patterns import compile_pattern

    path = os.fspath(path)
    allow_globals = tuple(allow_globals)
    if pattern:
        compile_pattern(pattern, "pattern")
    # safetensors are summarised from their headers, without importing torch (seconds and
    # hundreds of MiB); anything else, or verify, key, allow_globals, is opened with torch.
    plain = not verify and key is None and not allow_globals
    ckpt = open_header_checkpoint(path) if plain else None
    verdicts = None
    if ckpt is None:
        from ckptsurgeon.formats import integrity, open_checkpoint

        ckpt = open_checkpoint(path, key, allow_globals)
        if verify:
            verdicts = integrity.verify_checkpoint(ckpt)
            integrity.raise_if_corrupt(verdicts)
    summary = report.summarize(ckpt, pattern)
    if verdicts is not None:
        summary["verify"] = integrity.verify_report(verdicts)
    return InspectResult(summary, verdicts)


def check(
    path: str | os.PathLike,
    target: str,
    *,
    kwargs: Kwargs = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> CheckResult:
    """Would ``path`` load strictly into ``target`` (a model spec, checkpoint or manifest;
    ``kwargs`` for the model, a mapping or JSON)? Returns a
    :class:`~ckptsurgeon.targets.check.CheckResult` (``ok``, ``lines()``, ``to_dict()``)."""
    model_kwargs = _kwargs(kwargs)
    from ckptsurgeon.formats import open_checkpoint
    from ckptsurgeon.targets.check import check_table
    from ckptsurgeon.targets.spec import target_from_cli

    allow_globals = tuple(allow_globals)
    info = target_from_cli(target, model_kwargs, allow_globals)
    return check_table(open_checkpoint(os.fspath(path), key, allow_globals).tensors, info)


def diff(
    a: str | os.PathLike,
    b: str | os.PathLike | None = None,
    *,
    target: str | None = None,
    kwargs: Kwargs = None,
    suggest: bool = False,
    verify: bool = False,
    reference: str | None = None,
    reference_kwargs: Kwargs = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> DiffResult:
    """Differences between checkpoint ``a`` and checkpoint ``b`` (or ``target``, a model
    spec with ``kwargs``): prefixes, renames, heads, shapes, dtypes. With ``suggest``, also
    the rules file that reconciles them (``rules_file``); with ``verify`` (and a model
    ``target`` and ``reference``, the model A loads into) that file gets a ``verify:``
    section, which is run and kept only if it passes.

    The result's ``same`` says whether A and B are the same (with ``suggest``: whether the
    rules make A load strictly into B), its ``ok`` also that the verification passed.
    """
    # The arguments are judged before the imports below load torch.
    a = os.fspath(a)
    b = os.fspath(b) if b is not None else None
    allow_globals = tuple(allow_globals)
    if (b is None) == (target is None):
        raise UsageError("diff: give B or a target (exactly one)")
    if verify and not (suggest and reference and target):
        raise UsageError("verify goes with suggest, a target model and a reference model")
    if (reference or reference_kwargs) and not verify:
        raise UsageError("reference and reference_kwargs go with verify")
    if kwargs is not None and target is None:
        raise UsageError("kwargs goes with target")
    if b is not None and ":" not in b and not os.path.exists(os.path.expanduser(b)):
        raise InputError(f"{b}: no such file or folder")
    model_kwargs = _kwargs(kwargs)
    reference_model_kwargs = _kwargs(reference_kwargs, "reference_kwargs")

    from ckptsurgeon.formats import open_checkpoint
    from ckptsurgeon.paths import is_hf
    from ckptsurgeon.rules.config import SourceSpec
    from ckptsurgeon.suggest import absolute_target, compare, render_rules
    from ckptsurgeon.targets.spec import resolve_target, target_spec_from_cli

    spec = target_spec_from_cli(b if b is not None else str(target), model_kwargs, allow_globals)
    ckpt = open_checkpoint(a, key, allow_globals)
    report = compare(ckpt, resolve_target(spec))
    result = DiffResult(report, suggest=suggest)
    if suggest:
        source = SourceSpec(
            path=a if is_hf(a) else os.path.abspath(a),
            key=ckpt.container,
            allow_globals=list(allow_globals),
        )
        section = None
        if verify and report.reconciled:
            from ckptsurgeon.suggest.verify import suggest_verify

            ref = absolute_target(target_spec_from_cli(str(reference), reference_model_kwargs))
            section, result.verified = suggest_verify(report, source, spec, ref, os.getcwd())
            section = section if result.verified.ok else None
        result.rules_file = render_rules(report, source, absolute_target(spec), section)
    return result


@on_rank_zero
def convert(
    source: str,
    output: str,
    *,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    format: str | None = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
    progress: bool | Progress | None = None,
    durable: bool = True,
) -> ConvertResult:
    """Rewrite ``source`` into ``format`` (safetensors, torch, dcp, or a plug-in's) or the
    one ``output``'s suffix names, optionally casting floating tensors to ``dtype`` and
    sharding a folder output; ``progress``: True for a bar, or a progress object.

    Under torchrun rank 0 converts while the other ranks wait, and every rank returns what
    rank 0 wrote (see :mod:`ckptsurgeon.engine.ranks`)."""
    from ckptsurgeon.formats import registry
    from ckptsurgeon.formats.writer import parse_size

    # What the arguments alone decide fails now, not after torch is imported and the
    # source read: the dtype, the output format, the shard size (the writer checks the
    # output path itself, and these again).
    if dtype is not None:
        _check_dtype_name(dtype)
    output_kind = registry.output_for(output, format)[1]
    if max_shard_size is not None:
        if not output_kind.folder:
            raise UsageError("max_shard_size needs a folder output (a path with no suffix)")
        parse_size(max_shard_size)

    from ckptsurgeon.job import hashing_ahead, running

    # With a dtype every floating tensor is converted, not copied: little to hash ahead.
    with hashing_ahead(None if dtype else source):
        from ckptsurgeon.formats import open_checkpoint
        from ckptsurgeon.formats.atomic import refuse_overwriting_inputs
        from ckptsurgeon.formats.table import cast_floating, parse_dtype
        from ckptsurgeon.formats.writer import provenance, write_checkpoint

        ckpt = open_checkpoint(source, key, allow_globals)
        refuse_overwriting_inputs(output, [source, *ckpt.files])
        table = ckpt.tensors
        if dtype is not None:
            try:
                cast = parse_dtype(dtype)
            except ValueError as exc:
                raise UsageError(f"dtype: {exc}") from None
            if not cast.is_floating_point:
                raise UsageError(
                    f"dtype {dtype}: converting casts every floating tensor, so it takes a "
                    "floating-point dtype (bfloat16, float16, float32, ...)"
                )
            table = cast_floating(table, cast)
        with running(_progress(progress, "converting")) as sink:
            written = write_checkpoint(
                table,
                output,
                max_shard_size=max_shard_size,
                metadata=provenance(source),
                progress=sink,
                durable=durable,
                format=format,
            )
    return ConvertResult(source, written.path, written.kind, written.files, written.total_bytes)


def validate(rules: str | os.PathLike) -> ValidateResult:
    """Check a rules file against the schema; nothing is loaded. Raises RulesError (exit 2)
    naming file, line and field."""
    from ckptsurgeon.rules.document import load_rules

    path = os.fspath(rules)
    document = load_rules(path)
    sections = [s for s in ("target", "finetune", "verify") if getattr(document, s) is not None]
    return ValidateResult(path, len(document.rules), sections)


def verify(
    rules: str | os.PathLike,
    *,
    output: str | None = None,
    source: str | None = None,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> VerifyReport:
    """Run a rules file's ``verify:`` section on its written output (``output`` overrides
    the file's): does it compute what the source computed? The result has ``ok`` and reads
    as the report ``ckptsurgeon verify --json`` prints."""
    from ckptsurgeon.job import Job, ReadOptions

    job = Job.from_file(
        rules, source=source, output=output, read=ReadOptions(key, tuple(allow_globals))
    )
    return VerifyReport(job.output_path, job.verify())


def finetune(
    config: str | os.PathLike,
    *,
    resume: bool = False,
    weights: str | None = None,
    dry_run: bool = False,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
    reporter: Reporter | None = None,
) -> FinetuneResult:
    """Run a file's ``finetune:`` section alone (torchrun-compatible), from ``weights``
    (default: the file's) or, with ``resume``, from the last completed epoch; with
    ``dry_run`` nothing is trained and the result is the freeze and phases it would train.
    ``reporter`` receives the progress lines (default: the ``ckptsurgeon`` logger)."""
    from ckptsurgeon.job import Job, QuietReporter, ReadOptions

    job = Job.from_file(config, read=ReadOptions(key, tuple(allow_globals)))
    if dry_run:
        return FinetuneResult(job.finetune_plan(), dry_run=True)
    log = (reporter or QuietReporter()).log
    return FinetuneResult(job.finetune(weights=weights, resume=resume, log=log))


def apply(
    rules: str | os.PathLike | Mapping[str, Any],
    *,
    source: str | None = None,
    output: str | None = None,
    dry_run: bool = False,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
    skip_up_to_date: bool = False,
    report: str | os.PathLike | None = None,
    durable: bool = True,
    progress: bool | Progress | None = None,
    finetune: bool = True,
    reporter: Reporter | None = None,
) -> ApplyResult:
    """Run a rules file as ``ckptsurgeon apply`` does; returns the result, which reads as
    the report (a dict: ``result["written"]["path"]``) and has it typed as ``.report``.

    ``rules`` is a path, or the document itself as a mapping (``{"source": ..., "rules":
    [...]}``, paths in it relative to the working directory). ``skip_up_to_date``: do
    nothing when the output was made by this version from the same inputs and rules (the
    result is then ``{"output": ..., "up_to_date": True}``); ``report``: also write the
    report there as JSON (on failure too); ``durable``: fsync (default); ``progress``:
    True for a bar, or a progress object; ``finetune``: run the file's ``finetune:``
    section after the write; ``reporter``: what to show while it runs (default: log).

    Raises :class:`~ckptsurgeon.errors.FitError` when the result does not fit the target
    (nothing is written), VerifyError when it does not compute what the source computed,
    RulesError for invalid rules, InputError for bad input.
    """
    from ckptsurgeon.job import Job, ReadOptions, WriteOptions

    read = ReadOptions(key, tuple(allow_globals))
    if isinstance(rules, Mapping):
        job = Job.from_mapping(rules, source=source, output=output, read=read)
    else:
        job = Job.from_file(rules, source=source, output=output, read=read)
    return job.run(
        dry_run=dry_run,
        finetune=finetune,
        skip_up_to_date=skip_up_to_date,
        write=WriteOptions(_progress(progress, "writing"), durable),
        report_path=os.fspath(report) if report is not None else None,
        reporter=reporter,
    )
