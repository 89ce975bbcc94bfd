"""Regular expressions in rules: compiled once, with errors that name where they came from,
and shown in messages as the user wrote them."""

from __future__ import annotations

import re

from ckptsurgeon.errors import UsageError


def show_pattern(text: str) -> str:
    """A regular expression or replacement template quoted as it is written in a rules file
    (YAML single quotes, backslashes as typed): ``'^fc\\.'``, not repr's ``'^fc\\\\.'``.

    A text holding a single quote is shown in double quotes when it has no backslash (which
    double-quoted YAML would read as an escape), else as YAML writes it in single quotes
    (the quote doubled); one with control characters as repr shows it."""
    if not text.isprintable():
        return repr(text)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    return "'" + text.replace("'", "''") + "'"


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """``re.compile`` with a UsageError naming ``where`` for a bad expression."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(
            f"{where}: invalid regular expression {show_pattern(pattern)}: {exc}"
        ) from None
