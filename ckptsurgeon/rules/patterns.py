"""Regular expressions in rules: compiled once, with errors that name where they came from."""

from __future__ import annotations

import re

from ckptsurgeon.errors import UsageError


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """``re.compile`` with a UsageError naming ``where`` for a bad expression."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{where}: invalid regular expression {pattern!r}: {exc}") from None
