"""The ``ckptsurgeon`` command: a thin shell over the library.

Heavy imports (torch, the engine) happen inside each command so that ``--help``,
``validate`` and ``schema`` start in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from ckptsurgeon.engine.ranks import on_rank_zero
from ckptsurgeon.errors import INTERNAL_ERROR, CkptSurgeonError

if TYPE_CHECKING:
    from ckptsurgeon.engine.report import ApplyReport
    from ckptsurgeon.formats.prehash import SourceDigests
    from ckptsurgeon.job import Job

_DEBUG = False


def _stderr(message: str) -> None:
    click.echo(f"ckptsurgeon: {message}", err=True)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map library exceptions to SPEC's exit codes with one line on stderr; with ``--json``,
    also ``{"error": {"type", "message", "exit_code"}}`` on stdout (merged into the report
    when the failure carries one)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except CkptSurgeonError as exc:
            if _DEBUG:
                traceback.print_exc()
            _stderr(f"error: {exc}")
            _fail(as_json, exc, exc.exit_code, getattr(exc, "report", None))
        except KeyboardInterrupt as exc:
            _stderr("interrupted; nothing was written")
            _fail(as_json, exc, 130)
        except Exception as exc:  # a bug of ours: still one line, details behind --debug
            if _DEBUG:
                traceback.print_exc()
            _stderr(
                f"internal error: {type(exc).__name__}: {exc} -- this is a bug in ckptsurgeon; "
                "please report it with the output of `ckptsurgeon --debug ...` and "
                "`ckptsurgeon env`"
            )
            _fail(as_json, exc, INTERNAL_ERROR)

    return wrapper


def _fail(as_json: bool, exc: BaseException, code: int, report: Any = None) -> None:
    from ckptsurgeon.engine.ranks import launch

    if as_json and launch().main:  # under torchrun one JSON object, rank 0's
        error = {"type": type(exc).__name__, "message": str(exc), "exit_code": code}
        body = report.to_dict() if report is not None else {}
        _print_json({**body, "error": error})
    sys.exit(code)


def source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--key`` and ``--allow-global``, shared by every command that reads a checkpoint."""
    fn = click.option(
        "--key",
        default=None,
        help="Nested container holding the state dict (state_dict, model, a/b).",
    )(fn)
    fn = click.option(
        "--allow-global",
        "allow_globals",
        multiple=True,
        metavar="module.Name",
        help="Admit a named benign class in a pickle (repeatable).",
    )(fn)
    return fn


def target_options(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--target SPEC`` and ``--kwargs JSON``, shared by ``check`` and ``diff``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option(
            "--kwargs", default=None, metavar="JSON", help="Keyword arguments for the model."
        )(fn)
        where = "" if required else "Instead of B: "
        return click.option(
            "--target",
            "target",
            required=required,
            default=None,
            metavar="SPEC",
            help=f"{where}pkg.module:callable, file.py:callable, a checkpoint or a manifest.",
        )(fn)

    return decorate


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="ckptsurgeon")
def cli(debug: bool) -> None:
    """Checkpoint surgery: rewrite keys and tensors by rules, prove the result loads
    strictly into the target model, write it safely, and fine-tune from it."""
    global _DEBUG
    _DEBUG = debug
    from ckptsurgeon import _torchcheck

    warning = _torchcheck.unpickler_warning(_torchcheck.installed_torch())
    if warning:
        _stderr(f"warning: {warning}")
        _torchcheck.warned = True


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a valid manifest).")
@click.option("--filter", "pattern", default=None, metavar="REGEX", help="Only names matching.")
@click.option(
    "--verify",
    is_flag=True,
    help="Recompute recorded checksums (sha256, zip CRC-32); exit 3 naming what is corrupt.",
)
@click.option(
    "--all", "show_all", is_flag=True, help="List every tensor (default: folded past 40)."
)
@source_options
@handle_errors
def inspect(
    path: str,
    as_json: bool,
    pattern: str | None,
    verify: bool,
    show_all: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Tensors, shapes, dtypes, bytes and a prefix tree of a checkpoint."""
    from ckptsurgeon.formats.header_table import open_header_checkpoint
    from ckptsurgeon.reporting import inspect as report
    from ckptsurgeon.rules.patterns import compile_pattern

    if pattern:
        compile_pattern(pattern, "--filter")
    # safetensors are summarised from their headers, without importing torch (seconds and
    # hundreds of MiB); anything else, or --verify, --key, --allow-global, is opened with
    # torch (so with --verify, integrity and verdicts are always bound below).
    plain = not verify and key is None and not allow_globals
    ckpt = open_header_checkpoint(path) if plain else None
    if ckpt is None:
        from ckptsurgeon.formats import integrity, open_checkpoint

        ckpt = open_checkpoint(path, key, allow_globals)
        verdicts = integrity.verify_checkpoint(ckpt) if verify else []
        integrity.raise_if_corrupt(verdicts)
    summary = report.summarize(ckpt, pattern)
    if verify:
        summary["verify"] = integrity.verify_report(verdicts)
    if as_json:
        _print_json(summary)
    else:
        report.render(summary, _console(), show_all=show_all)
        if verify:
            for line in integrity.verify_lines(verdicts):
                click.echo(line)


@cli.command()
@click.argument("source")
@click.argument("output")
@click.option("--dtype", default=None, help="Cast floating tensors (bfloat16, float16, ...).")
@click.option("--max-shard-size", default=None, help="Shard a folder output, e.g. 5GB.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["safetensors", "torch", "dcp"]),
    default=None,
    help="Output format (default: from OUTPUT's suffix); dcp writes a DCP folder.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--no-fsync", is_flag=True, help="Atomic but not durable: skip waiting for the disk.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@source_options
@handle_errors
def convert(
    source: str,
    output: str,
    dtype: str | None,
    max_shard_size: str | None,
    output_format: str | None,
    quiet: bool,
    no_fsync: bool,
    as_json: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Convert a checkpoint to another format with no rules. Under torchrun rank 0 writes
    and prints; the other ranks wait for it."""
    from ckptsurgeon.engine.ranks import launch

    main = launch().main
    # With --dtype every floating tensor is converted, not copied: little to hash ahead.
    with _hashing_ahead(None if dtype or not main else source) as prehashed:
        from ckptsurgeon.api import convert as convert_api
        from ckptsurgeon.reporting.progress import ByteProgress
        from ckptsurgeon.reporting.text import human_bytes

        with ByteProgress("converting", quiet=quiet or not main) as progress:
            result = convert_api(
                source,
                output,
                dtype=dtype,
                max_shard_size=max_shard_size,
                key=key,
                allow_globals=allow_globals,
                progress=progress,
                durable=not no_fsync,
                prehashed=prehashed,
                format=output_format,
            )

    if not main:
        return
    _stderr(f"wrote {result.path} ({len(result.files)} file(s), {human_bytes(result.total_bytes)})")
    if as_json:
        _print_json(
            {
                "source": source,
                "output": result.path,
                "kind": result.kind,
                "files": result.files,
                "bytes": result.total_bytes,
            }
        )


@cli.command()
@click.argument("rules_file", metavar="RULES.yaml")
@click.option("--source", default=None, help="Override the rules file's source (relative to cwd).")
@click.option("--output", default=None, help="Override output.path (relative to cwd).")
@click.option("--dry-run", is_flag=True, help="Plan and check only; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--report", "report_path", default=None, help="Also write the JSON report here.")
@click.option("--no-finetune", is_flag=True, help="Skip the finetune: section, if any.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no plan table.")
@click.option(
    "--verbose", is_flag=True, help="List every key in the plan (default: layer indices folded)."
)
@click.option("--no-fsync", is_flag=True, help="Atomic but not durable: skip waiting for the disk.")
@click.option(
    "--skip-up-to-date",
    is_flag=True,
    help="Do nothing when the output was made by this version from the same inputs and rules.",
)
@source_options
@handle_errors
def apply(
    rules_file: str,
    source: str | None,
    output: str | None,
    dry_run: bool,
    as_json: bool,
    report_path: str | None,
    no_finetune: bool,
    quiet: bool,
    verbose: bool,
    no_fsync: bool,
    skip_up_to_date: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Load, rewrite by the rules, check against the target, write. Under torchrun rank 0
    writes and reports; the other ranks wait for it, then fine-tune with it."""
    from ckptsurgeon.engine.ranks import launch
    from ckptsurgeon.job import Job, ReadOptions

    job = Job.from_file(
        rules_file, source=source, output=output, read=ReadOptions(key, allow_globals)
    )
    report = _apply_write(
        job, dry_run, as_json, report_path, quiet, verbose, no_fsync, skip_up_to_date
    )
    if report is None:  # up to date: nothing to do
        return
    if report.written is not None and job.document.finetune is not None and not no_finetune:
        report.finetune = job.finetune(
            weights=report.written.path, read=ReadOptions(), log=_log_for(as_json)
        )
    if launch().main:
        out = report.to_dict()
        if dry_run and job.document.finetune is not None and not no_finetune:
            out["finetune_plan"] = _show_finetune_plan(job, as_json or quiet)
        _emit_report(out, as_json, report_path, show=as_json)


def _show_finetune_plan(job: Job, silent: bool) -> dict[str, Any]:
    """The freeze and phases the finetune: section will train (a strategy's expansion),
    printed unless ``silent``; returned as data for --json."""
    from ckptsurgeon.finetune.strategy import format_plan

    plan = job.finetune_plan()
    if not silent:
        click.echo(format_plan(plan), nl=False)
    return plan


@on_rank_zero
def _apply_write(
    job: Job,
    dry_run: bool,
    as_json: bool,
    report_path: str | None,
    quiet: bool,
    verbose: bool,
    no_fsync: bool,
    skip_up_to_date: bool,
) -> ApplyReport | None:
    """``apply`` up to the fine-tune, on rank 0 (the others receive its result): the
    report, or None when the output was up to date (then said so, and its report written)."""
    from ckptsurgeon.job import WriteOptions

    if skip_up_to_date and not dry_run and job.up_to_date():  # headers and stat: no torch
        done = {"output": job.output_path, "up_to_date": True}
        if not (as_json or quiet):
            click.echo(f"up to date: {job.output_path} was made from the same inputs and rules")
        _emit_report(done, as_json, report_path, show=as_json)
        return None
    with _hashing_ahead(None if dry_run else job.source_path) as prehashed:
        from ckptsurgeon.engine.plan import PlanFailed
        from ckptsurgeon.engine.verify import VerifyFailed
        from ckptsurgeon.reporting import plan as plan_report
        from ckptsurgeon.reporting.progress import ByteProgress

        try:
            with ByteProgress("writing", quiet=quiet) as progress:
                report = job.run(
                    dry_run=dry_run,
                    # Fine-tuned by apply, once the plan table is on screen.
                    finetune=False,
                    write=WriteOptions(progress, not no_fsync, prehashed),
                    report_path=report_path,
                )
            if skip_up_to_date:
                report.up_to_date = False
        except (PlanFailed, VerifyFailed) as exc:
            # --json prints the report with the error (handle_errors); --report gets it too.
            _emit_report(exc.report.to_dict(), as_json, report_path, show=False)
            raise
    if not as_json and not quiet:
        plan_report.render(report, _console(), verbose=verbose)
    return report


@contextlib.contextmanager
def _hashing_ahead(source: str | None) -> Iterator[SourceDigests | None]:
    """Hash a safetensors ``source``'s tensors in the background while the block runs.

    Entered before torch is imported, so the hashing takes the core that import leaves
    idle and copies later need not hash (see :mod:`ckptsurgeon.formats.prehash`). Yields
    None when there is nothing to hash.
    """
    from ckptsurgeon.formats.hub import local_path
    from ckptsurgeon.formats.prehash import SourceDigests

    digests = SourceDigests.start(local_path(source)) if source is not None else None
    try:
        yield digests
    finally:
        if digests is not None:
            digests.stop()


def _log_for(as_json: bool) -> Callable[[str], None]:
    """Progress lines go to stdout, or to stderr when stdout carries JSON."""
    return functools.partial(click.echo, err=as_json)


def _emit_report(report: dict, as_json: bool, path: str | None, show: bool) -> None:
    if path:
        from ckptsurgeon.errors import OutputError
        from ckptsurgeon.formats.atomic import atomic_path

        # A regular file is replaced atomically; a pipe, a link or /dev/stdout is written
        # through, as a shell redirection would.
        atomic = not os.path.lexists(path) or (os.path.isfile(path) and not os.path.islink(path))
        place = atomic_path(path, is_dir=False, durable=False) if atomic else None
        try:
            with (
                place or contextlib.nullcontext(path) as tmp,
                open(tmp, "w", encoding="utf-8") as f,
            ):
                json.dump(report, f, indent=2)
                f.write("\n")
        except OSError as exc:
            raise OutputError(f"writing the report {path} failed: {exc.strerror or exc}") from None
    if show and as_json:
        _print_json(report)


@cli.command()
@click.argument("path")
@target_options(required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@source_options
@handle_errors
def check(
    path: str,
    target: str,
    kwargs: str | None,
    as_json: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Does PATH load strictly into the target? Exit 0 if so, 1 if not."""
    from ckptsurgeon.formats import open_checkpoint
    from ckptsurgeon.targets.check import check_table
    from ckptsurgeon.targets.spec import target_from_cli

    info = target_from_cli(target, kwargs, allow_globals)
    result = check_table(open_checkpoint(path, key, allow_globals).tensors, info)
    verdict = "loads strictly into" if result.ok else "does NOT load strictly into"
    _verdict(result, as_json, f"{path} {verdict} {result.target}", failed=1)


@cli.command()
@click.argument("a")
@click.argument("b", required=False)
@target_options(required=False)
@click.option(
    "--suggest", is_flag=True, help="Print a rules file that reconciles A with B (verified)."
)
@click.option(
    "--verify",
    "verify_with",
    is_flag=True,
    help="With --suggest and --reference: add a verify: section, run it, print it if it passes.",
)
@click.option("--reference", default=None, metavar="SPEC", help="The model A loads into.")
@click.option("--reference-kwargs", default=None, metavar="JSON", help="Its keyword arguments.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@source_options
@handle_errors
def diff(
    a: str,
    b: str | None,
    target: str | None,
    kwargs: str | None,
    suggest: bool,
    verify_with: bool,
    reference: str | None,
    reference_kwargs: str | None,
    as_json: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Differences between checkpoint A and checkpoint B (or --target SPEC): prefixes,
    renames, heads, shapes, dtypes. With --suggest, print a rules file for `apply`.

    Exit 0 when A and B are the same (with --suggest: when the printed rules make A load
    strictly into B), 1 when not, as Unix diff does.
    """
    from ckptsurgeon.errors import InputError, UsageError
    from ckptsurgeon.formats import open_checkpoint
    from ckptsurgeon.paths import is_hf
    from ckptsurgeon.rules.config import SourceSpec
    from ckptsurgeon.suggest import absolute_target, compare, render_rules
    from ckptsurgeon.targets.spec import resolve_target, target_spec_from_cli

    if (b is None) == (target is None):
        raise UsageError("diff: give B or --target SPEC (exactly one)")
    if verify_with and not (suggest and reference and target):
        raise UsageError("--verify goes with --suggest, --target MODEL and --reference MODEL")
    if (reference or reference_kwargs) and not verify_with:
        raise UsageError("--reference and --reference-kwargs go with --verify")
    if kwargs is not None and target is None:
        raise UsageError("--kwargs goes with --target")
    if b is not None and ":" not in b and not os.path.exists(os.path.expanduser(b)):
        raise InputError(f"{b}: no such file or folder")
    spec = target_spec_from_cli(b if b is not None else str(target), kwargs, allow_globals)
    ckpt = open_checkpoint(a, key, allow_globals)
    report = compare(ckpt, resolve_target(spec))
    result: dict[str, Any] = report.to_dict()
    verified = None
    if suggest:
        source = SourceSpec(
            path=a if is_hf(a) else os.path.abspath(a),
            key=ckpt.container,
            allow_globals=list(allow_globals),
        )
        section = None
        if verify_with and report.reconciled:
            from ckptsurgeon.suggest.verify import suggest_verify

            ref = absolute_target(target_spec_from_cli(reference, reference_kwargs))
            section, verified = suggest_verify(report, source, spec, ref, os.getcwd())
            result["verify"] = verified.to_dict()
            section = section if verified.ok else None
        result["rules_file"] = render_rules(report, source, absolute_target(spec), section)
    if as_json:
        _print_json(result)
    elif suggest:
        click.echo(result["rules_file"], nl=False)
        if report.reconciled:
            count = len(report.rules.rules)
            _stderr(f"{count} rule{'' if count == 1 else 's'}; verified: A loads strictly into B")
            if verified is not None:
                how = "computes" if verified.ok else "does NOT compute"
                _stderr(f"verify: the result {how} what A computes in the reference model")
                for line in verified.lines():
                    click.echo(f"  {line}", err=True)
        else:
            _stderr("not reconciled; with these rules, apply would still fail:")
            for line in report.remaining():
                click.echo(f"  {line}", err=True)
    else:
        for line in report.text():
            click.echo(line)
    if not (report.reconciled if suggest else report.identical):
        sys.exit(1)
    if verified is not None and not verified.ok:
        sys.exit(4)


@cli.command()
@click.argument("rules_file", metavar="RULES.yaml")
@click.option("--output", default=None, help="Verify this output (relative to cwd).")
@click.option("--source", default=None, help="Override the rules file's source (relative to cwd).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@source_options
@handle_errors
def verify(
    rules_file: str,
    output: str | None,
    source: str | None,
    as_json: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Does the written output compute what the source computed? (the file's verify:
    section). Exit 0 if so, 4 if not."""
    from ckptsurgeon.job import Job, ReadOptions

    job = Job.from_file(
        rules_file, source=source, output=output, read=ReadOptions(key, allow_globals)
    )
    result = job.verify()
    verdict = "computes" if result.ok else "does NOT compute"
    _verdict(result, as_json, f"{job.output_path} {verdict} what the source computed", failed=4)


def _verdict(result: Any, as_json: bool, headline: str, failed: int) -> None:
    """Print a check's or a verification's result (``to_dict``, ``lines``, ``ok``); exit
    ``failed`` when it did not pass."""
    if as_json:
        _print_json(result.to_dict())
    else:
        click.echo(headline)
        for line in result.lines():
            click.echo(f"  {line}")
    if not result.ok:
        sys.exit(failed)


@cli.command()
@click.argument("rules_file", metavar="RULES.yaml")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def validate(rules_file: str, as_json: bool) -> None:
    """Check a rules file against the schema; nothing is loaded."""
    from ckptsurgeon.rules.document import load_rules

    rules = load_rules(rules_file)
    if as_json:
        sections = [s for s in ("target", "finetune", "verify") if getattr(rules, s) is not None]
        _print_json(
            {"path": rules_file, "valid": True, "rules": len(rules.rules), "sections": sections}
        )
    else:
        click.echo(f"{rules_file}: valid ({len(rules.rules)} rules)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Accepted for symmetry: always JSON.")
@handle_errors
def schema(as_json: bool) -> None:
    """Print the JSON Schema of the rules file (for editors)."""
    from ckptsurgeon.rules.document import RulesFile

    _print_json(RulesFile.model_json_schema())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@handle_errors
def env(as_json: bool) -> None:
    """Versions of Python, torch and the checkpoint libraries, and CUDA devices: what a bug
    report needs."""
    from ckptsurgeon.reporting.env import collect, lines

    info = collect()
    if as_json:
        _print_json(info)
    else:
        for line in lines(info):
            click.echo(line)


@cli.command()
@click.argument("config", metavar="CONFIG.yaml")
@click.option("--resume", is_flag=True, help="Continue from the last completed epoch.")
@click.option("--weights", default=None, help="Start from these weights (default: the file's).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--dry-run", is_flag=True, help="Print the freeze and phases it would train; train nothing."
)
@source_options
@handle_errors
def finetune(
    config: str,
    resume: bool,
    weights: str | None,
    as_json: bool,
    dry_run: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Run a file's finetune: section alone (torchrun-compatible)."""
    from ckptsurgeon.job import Job, ReadOptions

    job = Job.from_file(config, read=ReadOptions(key, allow_globals))
    if dry_run:
        plan = _show_finetune_plan(job, as_json)
        if as_json:
            _print_json(plan)
        return
    summary = job.finetune(weights=weights, resume=resume, log=_log_for(as_json))
    if as_json:
        _print_json(summary)


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)


def main() -> None:
    cli(prog_name="ckptsurgeon")
