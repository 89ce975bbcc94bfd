"""The human form of an ``apply`` report: the output keys and what happened to them.

By default the plan is folded, one line per action and name pattern:

1. keys that one action changed the same way (a prefix stripped, added or replaced, a cast,
   kept as they were...) share one line when listing them would take many rows:
   ``stripped 'module.' from 120 keys: conv1.weight, bn1.*, layer{1..4}.*``, the patterns
   naming exactly those keys (:func:`~ckptsurgeon.reporting.fold.cover`);
2. the other keys (the ones that differ: a new head, renames, splits...) get a row each,
   keys that differ only in a layer index, with the same shape, dtype and actions, sharing
   one (``model.layers.{0..31}.mlp.up_proj.weight  ...  x32``);
3. the dropped keys, the same two ways (by reason).

``--verbose`` lists every key. ``--json`` and ``--report`` always carry every key. On a
terminal the lines fit its width (names and sources shortened in the middle with ``…``,
what is still too long wrapped: the action is never cut); into a pipe or a file nothing is
shortened or wrapped.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from rich.console import Console

from ckptsurgeon.reporting.fold import NameTree, fold_rows
from ckptsurgeon.reporting.text import columns, human_bytes, shorten_name, wrap

if TYPE_CHECKING:
    from ckptsurgeon.engine.report import ApplyReport, KeyEntry

#: Keys changed the same way share one summary line when their rows (folded by layer
#: index) would be more than this many, and at least twice as many as the line's patterns.
SUMMARY_ROWS = 3
#: A summary line shows at most this many name patterns (the others are counted).
PATTERNS_SHOWN = 8
#: Actions that only change a key's name (their ``sources`` are the name before).
NAME_VERBS = frozenset({"stripped", "prefixed", "renamed", "mapped"})
#: On a terminal: the share of its width a name column keeps (names give way to actions up
#: to there), and the narrowest a source is shortened to on its row's line.
NAME_SHARE = 0.4
ORIGIN_MIN = 20

ORDER = [
    "kept",
    "stripped",
    "prefixed",
    "renamed",
    "mapped",
    "cast",
    "transposed",
    "reshaped",
    "permuted",
    "split",
    "merged",
    "copied",
    "resized",
    "input",
    "reinit",
    "filled",
]
_NOT_ACTIONS = ("source keys", "output keys", "dropped")


def render(report: ApplyReport, console: Console, verbose: bool = False) -> None:
    """Print the plan: folded (see the module's text) unless ``verbose``, which lists every
    key; then the counts, the check (or that there was none) and the verdict."""
    width = console.width if console.is_terminal else None

    def say(*lines: str) -> None:
        for line in lines:
            for part in wrap(line, width):
                console.print(part, markup=False, highlight=False)

    src = report.source
    console.print(f"source: {src.path} ({src.format}" + (f", {src.note}" if src.note else "") + ")")
    if report.target:
        console.print(f"target: {report.target}")
    if verbose:
        _every_key(report, say, width)
    else:
        _folded(report, say, width)
    say(*footer(report))
    check = report.check
    if check:
        console.print(
            f"check against {check.target}: "
            + ("[green]loads strictly[/]" if check.ok else "[red]FAILS[/]")
        )
        for name, was, becomes in check.dtype[:5]:
            console.print(f"  dtype {name}: {was} -> {becomes} on load")
    elif report.check_skipped:
        say(report.check_skipped)
    if report.verify is not None:
        verdict = (
            "[green]computes what the source computed[/]" if report.verify.ok else "[red]FAILS[/]"
        )
        console.print(f"verify: {verdict}")
        for line in report.verify.lines():
            console.print(f"  {line}", markup=False, highlight=False)
    if report.dry_run:
        console.print(
            f"dry run: nothing written (would write {report.output or '(no output set)'})"
        )
    elif report.written:
        w = report.written
        console.print(f"wrote {w.path} ({len(w.files)} file(s), {human_bytes(w.bytes)})")


def footer(report: ApplyReport) -> list[str]:
    """The counts: keys read, written and dropped (the same numbers the folded plan's note
    gives), then how many output keys each action touched."""
    counts = report.counts
    out = (
        f"source keys: {counts.get('source keys', 0)}, "
        f"output keys: {counts.get('output keys', len(report.keys))} "
        f"({human_bytes(report.total_bytes)}), dropped: {counts.get('dropped', 0)}"
    )
    actions = [(k, counts[k]) for k in ORDER if counts.get(k)]
    actions += [(k, v) for k, v in counts.items() if k not in ORDER and k not in _NOT_ACTIONS and v]
    if not actions:
        return [out]
    several = sum(len({a.verb for a in e.actions}) > 1 for e in report.keys)
    line = "output keys by action: " + ", ".join(f"{k} {v}" for k, v in actions)
    if several:
        line += f" ({several} key{'s have' if several > 1 else ' has'} more than one)"
    return [out, line]


def _what(entry: KeyEntry) -> str:
    return "; ".join(a.summary for a in entry.actions) or "kept"


def _every_key(report: ApplyReport, say, width: int | None) -> None:
    """One line per output key, then one per dropped key (``--verbose``)."""
    rows = []
    for entry in report.keys:
        origin = ", ".join(entry.sources) if entry.sources != (entry.name,) else ""
        rows.append(
            (
                entry.name,
                str(entry.shape),
                entry.dtype,
                _what(entry),
                f"<- {origin}" if origin else "",
            )
        )
    say(*fit_rows(rows, width))
    for name, reason in report.dropped.items():
        say(f"dropped {name}  ({reason})")


def _folded(report: ApplyReport, say, width: int | None) -> None:
    """Summary lines for keys changed the same way, rows for the others, then the dropped."""
    universe = NameTree([*(e.name for e in report.keys), *report.dropped])
    ways: dict[Hashable, list[int]] = {}
    rest: list[int] = []
    for i, entry in enumerate(report.keys):
        way = same_way(entry)
        if way is None:
            rest.append(i)
        else:
            ways.setdefault(way, []).append(i)
    # Ways that differ only in a layer index (a prefix renamed per layer) are one way. The
    # keys of a way not summarised keep the rows folded for it (keys changed in different
    # ways never share a row).
    summaries = []
    folded = []
    for folded_way in fold_rows(
        list(ways),
        name=lambda w: w[1][1],
        sources=lambda w: (w[1][0],),
        key=lambda w: (w[0], w[2], w[3]),
    ):
        indices = sorted(i for way in folded_way.members for i in ways[way])
        members = [report.keys[i] for i in indices]
        its_rows = _fold_keys(members)
        patterns = _summarised([m.name for m in members], len(its_rows), universe)
        if patterns is None:
            folded.extend(its_rows)
            continue
        verbs, _, other, _ = folded_way.members[0]
        change = (folded_way.sources[0], folded_way.name)
        summaries.append((indices[0], _summary(verbs, change, other, len(members), patterns)))
    summaries.sort()
    folded.extend(_fold_keys([report.keys[i] for i in rest]))
    position = {id(e): i for i, e in enumerate(report.keys)}
    folded.sort(key=lambda row: position[id(row.members[0])])
    rows = []
    for row in folded:
        entry = row.members[0]
        origin = ", ".join(row.sources) if entry.sources != (entry.name,) else ""
        rows.append(
            (
                row.name,
                str(entry.shape),
                entry.dtype,
                f"x{row.count}" if row.count > 1 else "",
                _what(entry),
                f"<- {origin}" if origin else "",
            )
        )
    say(*(line for _, line in summaries))
    say(*fit_rows(rows, width))

    by_reason: dict[str, list[str]] = {}
    for name, reason in report.dropped.items():
        by_reason.setdefault(reason, []).append(name)
    dropped_summaries, dropped_rows = [], []
    for reason, names in by_reason.items():
        folded_names = fold_rows(names, name=lambda n: n)
        patterns = _summarised(names, len(folded_names), universe)
        if patterns is not None:
            dropped_summaries.append(f"dropped {len(names)} keys: {_shown(patterns)}  ({reason})")
            continue
        for row in folded_names:
            count = f"  x{row.count}" if row.count > 1 else ""
            dropped_rows.append((row.members[0], f"dropped {row.name}{count}  ({reason})"))
    order = {name: i for i, name in enumerate(report.dropped)}
    dropped_rows.sort(key=lambda r: order[r[0]])
    say(*dropped_summaries, *(line for _, line in dropped_rows))

    lines = len(summaries) + len(rows) + len(dropped_summaries) + len(dropped_rows)
    n_out, n_dropped = len(report.keys), len(report.dropped)
    if lines < n_out + n_dropped:
        keys = f"{n_out} output keys" + (f" + {n_dropped} dropped" if n_dropped else "")
        say(
            f"({keys} in {lines} row{'s' if lines != 1 else ''}, folded by action and name pattern; "
            "--verbose lists every key)"
        )


def _fold_keys(entries: Sequence[KeyEntry]):
    return fold_rows(
        entries,
        name=lambda e: e.name,
        sources=lambda e: e.sources,
        key=lambda e: (e.shape, e.dtype, _what(e), e.sources == (e.name,)),
    )


def _summarised(names: list[str], rows: int, universe: NameTree) -> list[str] | None:
    """The patterns of a summary line for ``names``, or None where rows say it better."""
    if rows <= SUMMARY_ROWS:
        return None
    patterns = universe.cover(names)
    return patterns if 2 * len(patterns) <= rows else None


def _shown(patterns: list[str]) -> str:
    text = ", ".join(patterns[:PATTERNS_SHOWN])
    more = len(patterns) - PATTERNS_SHOWN
    return text + (f", and {more} more patterns (--verbose lists them)" if more > 0 else "")


def same_way(entry: KeyEntry) -> Hashable | None:
    """What was done to ``entry``, as a key equal for keys changed the same way: the verbs
    that changed its name and how (the part of the name before and after that changed), and
    the other actions' text. None for a key that can't share a summary line (several
    sources, a split, a copy, ...)."""
    named = [a for a in entry.actions if a.sources]
    if any(a.verb not in NAME_VERBS for a in named):
        return None
    other = tuple(str(a) for a in entry.actions if not a.sources)
    if not named:
        if entry.sources == (entry.name,) or not entry.sources:
            return ((), ("", ""), other, bool(entry.sources))
        return None
    if len(entry.sources) != 1:
        return None
    verbs = tuple(dict.fromkeys(a.verb for a in named))
    change = _name_change(entry.sources[0], entry.name, verbs)
    return None if change is None else (verbs, change, other, True)


def _name_change(old: str, new: str, verbs: tuple[str, ...]) -> tuple[str, str] | None:
    """``(a, b)``: ``old`` is ``a + rest`` and ``new`` is ``b + rest``; ``rest`` the longest
    common end that starts a segment in both (a stripped or added prefix is taken whole)."""
    if verbs == ("stripped",) and len(old) > len(new) and old.endswith(new):
        return old[: len(old) - len(new)], ""
    if verbs == ("prefixed",) and len(new) > len(old) and new.endswith(old):
        return "", new[: len(new) - len(old)]
    k = 0
    for i in range(1, min(len(old), len(new)) + 1):
        if old[-i] != new[-i]:
            break
        if (i == len(old) or old[-i - 1] == ".") and (i == len(new) or new[-i - 1] == "."):
            k = i
    if k == 0 or (k == len(old) and k == len(new)):
        return None
    return old[: len(old) - k], new[: len(new) - k]


def _summary(
    verbs: tuple[str, ...],
    change: tuple[str, str],
    other: tuple[str, ...],
    count: int,
    patterns: list[str],
) -> str:
    old, new = change
    if verbs:
        if verbs == ("stripped",) and not new:
            head = f"stripped {old!r} from {count} keys"
        elif verbs == ("prefixed",) and not old:
            head = f"prefixed {new!r} to {count} keys"
        else:
            head = f"{', '.join(verbs)} {old!r} -> {new!r} in {count} keys"
        if other:
            head += " and " + "; ".join(other)
    else:
        what = "; ".join(other) or "kept"
        head = f"{what} {count} keys" if " " not in what else f"{what} ({count} keys)"
    return f"{head}: {_shown(patterns)}"


def fit_rows(rows: list[tuple[str, ...]], width: int | None) -> list[str]:
    """Table rows (a name, more columns, what happened, then ``<- sources`` or "") as lines;
    a column empty in every row (no count: nothing folded) is left out.

    ``width=None`` (a pipe, a file): aligned columns, nothing shortened. A terminal's
    ``width``: the name column narrows so that the longest action fits (not below
    :data:`NAME_SHARE` of the width; names shortened in the middle, ``…``, by whole
    segments where that keeps most); the action follows whole, wrapped when it is too long (continuation
    lines indented); the sources follow on the same line, shortened in the middle to the
    room left, or on a line of their own when less than :data:`ORIGIN_MIN` is left.
    """
    if not rows:
        return []
    last = len(rows[0]) - 1
    keep = [i for i in range(last + 1) if i in (0, last - 1, last) or any(r[i] for r in rows)]
    rows = [tuple(r[i] for i in keep) for r in rows]
    if width is None:
        return columns(rows).splitlines()
    n = len(rows[0])
    w = [max(len(r[i]) for r in rows) for i in range(n - 2)]
    what_width = max(len(r[-2]) for r in rows)
    others = sum(w[1:]) + 2 * len(w)
    w[0] = min(w[0], max(width - others - what_width, int(width * NAME_SHARE), 16))
    out = []
    for r in rows:
        cells = [shorten_name(r[0], w[0]), *r[1 : n - 2]]
        head = "  ".join(c.ljust(x) for c, x in zip(cells, w, strict=True)) + "  "
        what, origin = r[-2], r[-1]
        aligned = head + what.ljust(what_width) + "  " + origin
        if not origin or len(aligned) <= width:
            out.extend(
                wrap((aligned if origin else head + what).rstrip(), width, _indent(head, width))
            )
            continue
        room = width - len(head) - len(what) - 2
        if room >= ORIGIN_MIN:
            out.append(head + what + "  " + _shorten_origin(origin, room))
            continue
        indent = _indent(head, width)
        kept = _shorten_origin(origin, width - indent).replace("<- ", "<-\xa0", 1)
        out.extend(
            line.replace("\xa0", " ") for line in wrap(f"{head}{what}  {kept}", width, indent)
        )
    return out


def _indent(head: str, width: int) -> int:
    """Continuation lines start under the action where that leaves half the width."""
    return len(head) if len(head) <= width // 2 else 4


def _shorten_origin(origin: str, width: int) -> str:
    if len(origin) <= width:
        return origin
    if origin.startswith("<- "):
        return "<- " + shorten_name(origin[3:], width - 3)
    return shorten_name(origin, width)
