"""Plain-text helpers shared by every report."""

from __future__ import annotations

import re
import textwrap


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def columns(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned text columns (never wrapped, so they stay greppable; no line
    ends in spaces)."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        (
            "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        ).rstrip()
        for r in rows
    )


def shorten_middle(text: str, width: int, tail: float = 0.5) -> str:
    """``text`` cut to ``width`` characters by an ellipsis in the middle (its start and end
    are what tell names apart; ``tail``: the share of them kept from the end); unchanged
    when it fits."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    tail = round((width - 1) * tail)
    head = width - 1 - tail
    return text[:head] + "…" + (text[-tail:] if tail else "")


def shorten_name(name: str, width: int) -> str:
    """A dotted name (or pattern: ``{0..31}`` is one segment) cut to ``width`` characters,
    its end kept (what tells keys apart): whole segments left out of its middle
    (``model.….self_attn.q_proj.weight``), or characters (``model.emb…ns.weight``) where
    that keeps more of it."""
    if len(name) <= width:
        return name
    segments = _SEGMENT_DOT.split(name)
    tail: list[str] = []
    for segment in reversed(segments[1:]):
        if len(segments[0]) + 3 + len(".".join([segment, *tail])) > width:
            break
        tail.insert(0, segment)
    by_segments = segments[0] + ".…." + ".".join(tail) if tail else ""
    by_chars = shorten_middle(name, width, tail=2 / 3)
    return by_segments if len(by_segments) >= len(by_chars) - 6 else by_chars


_SEGMENT_DOT = re.compile(r"\.(?![^{]*\})")


def wrap(line: str, width: int | None, indent: int = 4) -> list[str]:
    """``line`` as lines of at most ``width`` characters, broken at spaces, the continuation
    lines indented; a word longer than a line (a path) is kept whole. ``width=None``: one
    line, whatever its length (output for a pipe or a file)."""
    if width is None or len(line) <= width:
        return [line]
    indent = max(0, min(indent, width // 2))
    return textwrap.wrap(
        line,
        width,
        subsequent_indent=" " * indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [line]
