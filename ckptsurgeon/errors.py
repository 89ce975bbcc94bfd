"""One exception hierarchy for the whole library.

The CLI maps each class to the exit code that SPEC.md fixes, so library users and shell
users see the same categories:

* :class:`UsageError` (and :class:`RulesError`) -> 2: the request itself is wrong.
* :class:`FitError` -> 1: the checkpoint does not fit the rules or the target.
* :class:`InputError` (and :class:`UnsafeInputError`) -> 3: the input cannot be read safely.
* :class:`VerifyError` -> 4: the result loads but does not compute what the source did.
"""

from __future__ import annotations


class CkptSurgeonError(Exception):
    """Base class of every error ckptsurgeon raises on purpose."""

    exit_code: int = 1


class UsageError(CkptSurgeonError):
    """Bad command-line usage, a bad argument value or an unsafe output path."""

    exit_code = 2


class RulesError(UsageError):
    """A rules file that fails validation; the message names file, line and field."""


class FitError(CkptSurgeonError):
    """The checkpoint does not fit: a rule matched nothing, a rename collided, or the
    result does not load strictly into the target."""

    exit_code = 1


class InputError(CkptSurgeonError):
    """An unreadable or corrupt input: truncated file, bad header, missing shard."""

    exit_code = 3


class UnsafeInputError(InputError):
    """An input that would need code execution to load (a pickle global outside the
    allowlist, for example)."""


class OutputError(CkptSurgeonError):
    """Writing the output failed (disk full, permissions); nothing was left behind."""

    exit_code = 1


class VerifyError(CkptSurgeonError):
    """The result loads strictly but does not compute what the source computed."""

    exit_code = 4


# EX_SOFTWARE in sysexits.h: a bug in ckptsurgeon or in a plug-in, not bad input.
INTERNAL_ERROR = 70


class PluginError(CkptSurgeonError):
    """A plug-in broke its contract at run time (a reader that returned something other
    than tensors): the fault is that plug-in's, named in the message, not the input's."""

    exit_code = INTERNAL_ERROR


class CkptSurgeonWarning(UserWarning):
    """Something the user should know that does not stop the run (a skipped plug-in, verify
    inputs that cannot show a change); the CLI prints it as one ``warning:`` line."""
