"""The human form of an ``apply`` report: the output keys and what happened to them.

By default keys that differ only in a layer index, with the same shape, dtype and actions,
share one row (``model.layers.{0..31}.mlp.up_proj.weight  ...  x32``); ``--verbose`` lists
every key. ``--json`` and ``--report`` always carry every key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from ckptsurgeon.reporting.fold import fold_rows
from ckptsurgeon.reporting.text import columns, human_bytes

if TYPE_CHECKING:
    from ckptsurgeon.engine.report import ApplyReport, KeyEntry


def render(report: ApplyReport, console: Console, verbose: bool = False) -> None:
    """Print the plan: folded by layer index (:func:`~ckptsurgeon.reporting.fold.fold_rows`)
    unless ``verbose``, which lists every key; then the counts, the check and the verdict."""
    src = report.source
    console.print(f"source: {src.path} ({src.format}" + (f", {src.note}" if src.note else "") + ")")
    if report.target:
        console.print(f"target: {report.target}")
    if verbose:
        _every_key(report, console)
    else:
        _folded(report, console)
    counts = report.counts
    order = [
        "source keys",
        "output keys",
        "kept",
        "stripped",
        "prefixed",
        "renamed",
        "mapped",
        "dropped",
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
    shown = [f"{k}: {counts[k]}" for k in order if counts.get(k)]
    shown += [f"{k}: {v}" for k, v in counts.items() if k not in order and v]
    console.print(", ".join(shown) + f"; {human_bytes(report.total_bytes)}")
    check = report.check
    if check:
        console.print(
            f"check against {check.target}: "
            + ("[green]loads strictly[/]" if check.ok else "[red]FAILS[/]")
        )
        for name, was, becomes in check.dtype[:5]:
            console.print(f"  dtype {name}: {was} -> {becomes} on load")
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


def _what(entry: KeyEntry) -> str:
    return "; ".join(a.summary for a in entry.actions) or "kept"


def _every_key(report: ApplyReport, console: Console) -> None:
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
    console.print(columns(rows), markup=False, highlight=False)
    for name, reason in report.dropped.items():
        console.print(f"dropped {name}  ({reason})", markup=False, highlight=False)


def _folded(report: ApplyReport, console: Console) -> None:
    """One line per action and name pattern, layer indices folded, with a count."""
    folded = fold_rows(
        report.keys,
        name=lambda e: e.name,
        sources=lambda e: e.sources,
        key=lambda e: (e.shape, e.dtype, _what(e), e.sources == (e.name,)),
    )
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
    console.print(columns(rows), markup=False, highlight=False)
    dropped = fold_rows(report.dropped.items(), name=lambda d: d[0], key=lambda d: d[1])
    for row in dropped:
        count = f"  x{row.count}" if row.count > 1 else ""
        console.print(
            f"dropped {row.name}{count}  ({row.members[0][1]})", markup=False, highlight=False
        )
    lines, keys = len(folded) + len(dropped), len(report.keys) + len(report.dropped)
    if lines < keys:
        console.print(
            f"({keys} keys in {lines} rows, layer indices folded; --verbose lists every key)",
            markup=False,
            highlight=False,
        )
