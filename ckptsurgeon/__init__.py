"""ckptsurgeon: checkpoint surgery and conversion.

>>> import ckptsurgeon
>>> tensors = ckptsurgeon.load("ckpt.pth")            # lazy mapping name -> tensor
"""

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


def __getattr__(name: str):
    # The API pulls in torch; importing it lazily keeps `import ckptsurgeon` (and the CLI's
    # --help, validate and schema) fast.
    if name in {"apply", "load", "load_into", "save", "convert", "check", "verify"}:
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
    "load",
    "load_into",
    "save",
    "verify",
]
