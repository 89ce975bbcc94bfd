"""The ``ckptsurgeon`` command: a thin shell over the library.

Each command parses its flags, calls its function in :mod:`ckptsurgeon.commands` (the
Python API's), and prints the value it returns: ``--json`` prints its ``to_dict()``, the
human output is derived from the same value, and the exit code from its verdict.

Heavy imports (torch, the engine) happen inside each command so that ``--help``,
``validate`` and ``schema`` start in a fraction of a second; arguments that can be judged
alone (JSON options, a ``--target`` that names nothing) are checked while the command line
is read, so a typo fails in that fraction of a second too, the way every other error does.

``--quiet``/``-q`` means the same on every command that has it: nothing is printed on
success (no progress bar, no plan, no "wrote" line; ``--json`` still prints its object);
warnings and errors still are. Ctrl-C ends any command with exit code 130 and one line
saying what had been written by then (atomic writes leave nothing half-written).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from ckptsurgeon.errors import INTERNAL_ERROR, CkptSurgeonError, UsageError

if TYPE_CHECKING:
    from ckptsurgeon.engine.report import ApplyReport

_DEBUG = False

# The exit code of a command ended by Ctrl-C (SIGINT): 128 + 2, as shells report it.
INTERRUPTED = 130


def _stderr(message: str) -> None:
    click.echo(f"ckptsurgeon: {message}", err=True)


@dataclass
class _Progress:
    """How far the running command got, for the line Ctrl-C prints."""

    written: str | None = None  # the output apply wrote (complete: writes are atomic)
    finetuning: str | None = None  # the file whose fine-tune is running


_progress = _Progress()


def _interrupted() -> str:
    """What a Ctrl-C leaves behind, in one line."""
    if _progress.finetuning is not None:
        before = ""
        if _progress.written is not None:
            before = f"{_progress.written} had been written in full before it; "
        return (
            f"interrupted during the fine-tune; {before}`ckptsurgeon finetune "
            f"{_progress.finetuning} --resume` continues from the last completed epoch, if any"
        )
    if _progress.written is not None:
        return f"interrupted; {_progress.written} had been written in full"
    return "interrupted; nothing was written"


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map library exceptions to SPEC's exit codes with one line on stderr; with ``--json``,
    also ``{"error": {"type", "message", "exit_code"}}`` on stdout (merged into the report
    when the failure carries one). A bad argument found while the command line was read
    (see :func:`_hold`) fails here, before the command imports anything."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _progress
        as_json = bool(kwargs.get("as_json"))
        _progress = _Progress()
        try:
            ctx = click.get_current_context(silent=True)
            held = ctx.meta.get(_BAD_ARGUMENT) if ctx is not None else None
            if held is not None:
                raise UsageError(held)
            return fn(*args, **kwargs)
        except CkptSurgeonError as exc:
            if _DEBUG:
                traceback.print_exc()
            _stderr(f"error: {exc}")
            _fail(
                as_json, type(exc).__name__, str(exc), exc.exit_code, getattr(exc, "report", None)
            )
        except KeyboardInterrupt:
            _interrupts.handled()
            message = _interrupted()
            _stderr(message)
            _fail(as_json, "KeyboardInterrupt", message, INTERRUPTED)
        except Exception as exc:  # a bug of ours: still one line, details behind --debug
            if _DEBUG:
                traceback.print_exc()
            _stderr(
                f"internal error: {type(exc).__name__}: {exc} -- this is a bug in ckptsurgeon; "
                "please report it with the output of `ckptsurgeon --debug ...` and "
                "`ckptsurgeon env`"
            )
            _fail(as_json, type(exc).__name__, str(exc), INTERNAL_ERROR)

    return wrapper


def _fail(as_json: bool, kind: str, message: str, code: int, report: Any = None) -> None:
    from ckptsurgeon.engine.ranks import launch

    if as_json and launch().main:  # under torchrun one JSON object, rank 0's
        error = {"type": kind, "message": message, "exit_code": code}
        body = report.to_dict() if report is not None else {}
        _print_json({**body, "error": error})
    sys.exit(code)


# Where a click callback keeps the first bad argument it finds (Context.meta, which the
# command's context shares with the group's).
_BAD_ARGUMENT = "ckptsurgeon.bad_argument"


def _hold(ctx: click.Context, message: str) -> None:
    """Keep ``message`` (the first one) as the error of a bad argument found while the
    command line is read; :func:`handle_errors` raises it as a UsageError (exit 2) before
    the command runs, so it fails like any other error: one line on stderr, and with
    ``--json`` the error object on stdout (a click error would print usage instead, and no
    JSON)."""
    ctx.meta.setdefault(_BAD_ARGUMENT, message)


_JSON_TYPES = {
    list: "an array", str: "a string", int: "a number", float: "a number",
    bool: "true or false", type(None): "null",
}  # fmt: skip


def json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Click callback for an option that takes a JSON object (``--kwargs``): the object, or
    (held, see :func:`_hold`) a one-line error naming the flag."""
    if value is None:
        return None
    flag = param.opts[0] if param.opts else param.name
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at character {exc.pos + 1}"
        _hold(ctx, f"{flag}: not valid JSON ({where}){_as_json(flag, value)}")
        return None
    if not isinstance(obj, dict):
        kind = _JSON_TYPES.get(type(obj), type(obj).__name__)
        _hold(
            ctx, f"""{flag}: expected a JSON object such as '{{"num_classes": 10}}', not {kind}"""
        )
        return None
    return obj


def _as_json(flag: str, value: str) -> str:
    """For a JSON typo that YAML reads as a mapping (``{num_classes: 10}``, single quotes):
    the same object written as JSON."""
    import yaml

    try:
        obj = yaml.safe_load(value)
        text = json.dumps(obj)
    except (yaml.YAMLError, TypeError, ValueError):
        return ""
    if not isinstance(obj, dict) or any(v is None for v in obj.values()):
        return ""  # not what was meant: {num_classes:10} reads as {"num_classes:10": null}
    return f"; JSON quotes its keys and strings: {flag} '{text}'"


def target_spec(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback for ``--target`` and ``--reference``: a spec that is no file, no
    ``hf://`` name and no ``pkg.module:callable`` can name nothing (held, see :func:`_hold`)."""
    if value is None or ":" in value or os.path.exists(os.path.expanduser(value)):
        return value
    flag = param.opts[0] if param.opts else param.name
    _hold(ctx, f"{flag} {value!r}: not a file, and not 'pkg.module:callable'")
    return value


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
            "--kwargs",
            default=None,
            metavar="JSON",
            callback=json_object,
            help="Keyword arguments for the model, a JSON object.",
        )(fn)
        where = "" if required else "Instead of B: "
        return click.option(
            "--target",
            "target",
            required=required,
            default=None,
            metavar="SPEC",
            callback=target_spec,
            help=f"{where}pkg.module:callable, file.py:callable, a checkpoint or a manifest.",
        )(fn)

    return decorate


QUIET_HELP = "Print nothing on success (no progress, no plan); errors and warnings still print."


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices a registry gives when they are first needed (to
    check a value, or for ``--help``), not when this module is imported: plug-ins are
    found then, and ``ckptsurgeon --help`` loads no registry."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names = names
        super().__init__(())

    @property  # type: ignore[override]  # read from the registry, not stored
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:
        """click.Choice's __init__ stores its choices; these come from the registry."""


def _output_format_names() -> tuple[str, ...]:
    from ckptsurgeon.formats.registry import output_format_names

    return tuple(output_format_names())


def _plugin_warnings_on_one_line() -> None:
    """Print each :class:`~ckptsurgeon.errors.CkptSurgeonWarning` as one line
    ``ckptsurgeon: warning: MESSAGE`` on stderr instead of Python's two-line form (file,
    line and source of the ``warnings.warn`` call mean nothing to a user); any other
    warning is shown as before."""
    from ckptsurgeon.errors import CkptSurgeonWarning

    shown = warnings.showwarning
    if getattr(shown, "_ckptsurgeon", False):  # installed by an earlier call in this process
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if isinstance(category, type) and issubclass(category, CkptSurgeonWarning):
            _stderr(f"warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    show._ckptsurgeon = True  # type: ignore[attr-defined]
    warnings.showwarning = show


class _Group(click.Group):
    """The command group: a Ctrl-C before a command runs (while the command line is read,
    or plug-ins are found) ends with exit code 130 too, not click's "Aborted!" and 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupts.handled()
            _stderr("interrupted; nothing was written")
            sys.exit(INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="ckptsurgeon")
def cli(debug: bool) -> None:
    """Checkpoint surgery: rewrite keys and tensors by rules, prove the result loads
    strictly into the target model, write it safely, and fine-tune from it."""
    global _DEBUG
    _DEBUG = debug
    _plugin_warnings_on_one_line()
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
    from ckptsurgeon.commands import inspect as inspect_checkpoint
    from ckptsurgeon.reporting import inspect as report

    result = inspect_checkpoint(
        path, pattern=pattern, verify=verify, key=key, allow_globals=allow_globals
    )
    if as_json:
        _print_json(result.to_dict())
    else:
        report.render(result.summary, _console(), show_all=show_all)
        for line in result.verify_lines():
            click.echo(line)


@cli.command()
@click.argument("source")
@click.argument("output")
@click.option("--dtype", default=None, help="Cast floating tensors (bfloat16, float16, ...).")
@click.option("--max-shard-size", default=None, help="Shard a folder output, e.g. 5GB.")
@click.option(
    "--format",
    "output_format",
    type=RegistryChoice(_output_format_names),
    default=None,
    help="Output format (default: from OUTPUT's suffix); dcp writes a DCP folder.",
)
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
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
    from ckptsurgeon.commands import convert as convert_checkpoint
    from ckptsurgeon.engine.ranks import launch
    from ckptsurgeon.reporting.text import human_bytes

    result = convert_checkpoint(
        source,
        output,
        dtype=dtype,
        max_shard_size=max_shard_size,
        format=output_format,
        key=key,
        allow_globals=allow_globals,
        progress=not quiet,
        durable=not no_fsync,
    )
    if not launch().main:
        return
    if not quiet:
        _stderr(
            f"wrote {result.path} ({len(result.files)} file(s), {human_bytes(result.total_bytes)})"
        )
    if as_json:
        _print_json(result.to_dict())


@cli.command()
@click.argument("rules_file", metavar="RULES.yaml")
@click.option("--source", default=None, help="Override the rules file's source (relative to cwd).")
@click.option("--output", default=None, help="Override output.path (relative to cwd).")
@click.option("--dry-run", is_flag=True, help="Plan and check only; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--report", "report_path", default=None, help="Also write the JSON report here.")
@click.option("--no-finetune", is_flag=True, help="Skip the finetune: section, if any.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@click.option(
    "--verbose",
    is_flag=True,
    help="List every key in the plan (default: folded by action and name pattern).",
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
    from ckptsurgeon.commands import apply as apply_rules
    from ckptsurgeon.engine.ranks import launch

    result = apply_rules(
        rules_file,
        source=source,
        output=output,
        dry_run=dry_run,
        key=key,
        allow_globals=allow_globals,
        skip_up_to_date=skip_up_to_date,
        report=report_path,
        durable=not no_fsync,
        progress=not quiet,
        finetune=not no_finetune,
        reporter=_Printer(as_json=as_json, quiet=quiet, verbose=verbose, file=rules_file),
    )
    if as_json and launch().main:
        _print_json(result.to_dict())


class _Printer:
    """The job's reporter for ``apply`` and ``finetune``: the plan table, the up-to-date
    verdict and a dry run's fine-tune plan on stdout unless ``--json`` or ``--quiet``; the
    fine-tune's lines on stdout, or on stderr when stdout carries JSON, unless ``--quiet``.
    It also notes, for Ctrl-C's message, what was written and when the fine-tune of
    ``file`` starts."""

    def __init__(self, *, as_json: bool, quiet: bool, verbose: bool, file: str) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.shows = not (as_json or quiet)
        self.verbose = verbose
        self.file = file

    def log(self, message: str) -> None:
        _progress.finetuning = self.file  # the fine-tune is what logs
        if not self.quiet:
            click.echo(message, err=self.as_json)

    def up_to_date(self, output: str | None) -> None:
        if self.shows:
            click.echo(f"up to date: {output} was made from the same inputs and rules")

    def planned(self, report: ApplyReport) -> None:
        from ckptsurgeon.reporting import plan as plan_report

        if report.written is not None:
            _progress.written = report.written.path
        if self.shows:
            plan_report.render(report, _console(), verbose=self.verbose)

    def finetune_plan(self, plan: dict[str, Any]) -> None:
        if self.shows:
            _show_finetune_plan(plan)


def _show_finetune_plan(plan: dict[str, Any]) -> None:
    """The freeze and phases a finetune: section will train (a strategy's expansion)."""
    from ckptsurgeon.finetune.strategy import format_plan

    click.echo(format_plan(plan), nl=False)


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
    from ckptsurgeon.commands import check as check_checkpoint

    result = check_checkpoint(path, target, kwargs=kwargs, key=key, allow_globals=allow_globals)
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
@click.option(
    "--reference",
    default=None,
    metavar="SPEC",
    callback=target_spec,
    help="The model A loads into.",
)
@click.option(
    "--reference-kwargs",
    default=None,
    metavar="JSON",
    callback=json_object,
    help="Its keyword arguments, a JSON object.",
)
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
    from ckptsurgeon.commands import diff as diff_checkpoints

    result = diff_checkpoints(
        a,
        b,
        target=target,
        kwargs=kwargs,
        suggest=suggest,
        verify=verify_with,
        reference=reference,
        reference_kwargs=reference_kwargs,
        key=key,
        allow_globals=allow_globals,
    )
    report, verified = result.report, result.verified
    if as_json:
        _print_json(result.to_dict())
    elif suggest:
        click.echo(result.rules_file, nl=False)
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
    if not result.same:
        sys.exit(1)
    if not result.ok:
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
    from ckptsurgeon.commands import verify as verify_output

    result = verify_output(
        rules_file, output=output, source=source, key=key, allow_globals=allow_globals
    )
    _verdict(result, as_json, result.headline(), failed=4)


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
    from ckptsurgeon.commands import validate as validate_rules

    result = validate_rules(rules_file)
    if as_json:
        _print_json(result.to_dict())
    else:
        click.echo(result.line())


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
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@source_options
@handle_errors
def finetune(
    config: str,
    resume: bool,
    weights: str | None,
    as_json: bool,
    dry_run: bool,
    quiet: bool,
    key: str | None,
    allow_globals: tuple[str, ...],
) -> None:
    """Run a file's finetune: section alone (torchrun-compatible)."""
    from ckptsurgeon.commands import finetune as run_finetune
    from ckptsurgeon.engine.ranks import launch

    if not dry_run:
        _progress.finetuning = config
    result = run_finetune(
        config,
        resume=resume,
        weights=weights,
        dry_run=dry_run,
        key=key,
        allow_globals=allow_globals,
        reporter=_Printer(as_json=as_json, quiet=quiet, verbose=False, file=config),
    )
    if as_json and launch().main:  # under torchrun one JSON object, rank 0's
        _print_json(result.to_dict())
    elif dry_run and not quiet:
        _show_finetune_plan(result.to_dict())


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)


class _Interrupts:
    """Ctrl-C that no library can swallow.

    torch imports numpy from C and, when that import fails, clears the error and goes on
    without numpy; a Ctrl-C that lands in that import (a fraction of a second of every
    command that loads torch) is lost that way, and the command runs on to the end. So
    SIGINT is remembered until a handler here takes the KeyboardInterrupt, and while it
    is pending every new import in the main thread raises it again (an audit hook), which
    the next module torch imports soon does."""

    def __init__(self) -> None:
        self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        sys.addaudithook(self._on_event)

    def handled(self) -> None:
        self.pending = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.pending = True
        raise KeyboardInterrupt

    def _on_event(self, event: str, args: tuple[Any, ...]) -> None:
        if self.pending and event == "import" and threading.current_thread() is _MAIN_THREAD:
            raise KeyboardInterrupt


_interrupts = _Interrupts()
_MAIN_THREAD = threading.main_thread()


def main() -> None:
    if threading.current_thread() is _MAIN_THREAD:  # signal handlers: main thread only
        _interrupts.install()
    cli(prog_name="ckptsurgeon")
