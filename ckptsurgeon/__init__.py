"""ckptsurgeon: checkpoint surgery and conversion.

>>> import ckptsurgeon
>>> tensors = ckptsurgeon.load("ckpt.pth")            # lazy mapping name -> tensor
"""

import types
from typing import Any

from ckptsurgeon import finetune  # the subpackage (light: nothing of torch until it runs)
from ckptsurgeon._version import __version__
from ckptsurgeon.errors import (
    CkptSurgeonError,
    FitError,
    InputError,
    OutputError,
    RulesError,
    UnsafeInputError,
    UsageError,
    VerifyError,
)

_COMMANDS = {"apply", "check", "convert", "diff", "inspect", "validate", "verify"}


class _FinetunePackage(types.ModuleType):
    """``ckptsurgeon.finetune`` names the runner's subpackage, which Python binds here as
    soon as anything imports it, and every command has its function (SPEC): so calling the
    package runs the ``finetune`` command (:func:`ckptsurgeon.commands.finetune`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ckptsurgeon.commands import finetune as command

        return command(*args, **kwargs)


finetune.__class__ = _FinetunePackage


def __getattr__(name: str):
    # The API pulls in torch; importing it lazily keeps `import ckptsurgeon` (and the CLI's
    # --help, validate and schema) fast. The commands come from the module the API
    # re-exports them from, which imports no torch until a command needs it.
    if name in _COMMANDS:
        from ckptsurgeon import commands

        return getattr(commands, name)
    if name in {"load", "load_into", "save"}:
        from ckptsurgeon import api

        return getattr(api, name)
    raise AttributeError(f"module 'ckptsurgeon' has no attribute {name!r}")


__all__ = [
    "CkptSurgeonError",
    "FitError",
    "InputError",
    "OutputError",
    "RulesError",
    "UnsafeInputError",
    "UsageError",
    "VerifyError",
    "__version__",
    "apply",
    "check",
    "convert",
    "diff",
    "finetune",
    "inspect",
    "load",
    "load_into",
    "save",
    "validate",
    "verify",
]
