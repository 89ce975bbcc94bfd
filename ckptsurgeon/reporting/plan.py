"""The human form of an ``apply`` report: every output key and what happened to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from ckptsurgeon.reporting.text import columns, human_bytes

if TYPE_CHECKING:
    from ckptsurgeon.engine.report import ApplyReport


def render(report: ApplyReport, console: Console) -> None:
    src = report.source
    console.print(f"source: {src.path} ({src.format}" + (f", {src.note}" if src.note else "") + ")")
    if report.target:
        console.print(f"target: {report.target}")
    rows = []
    for entry in report.keys:
        what = "; ".join(a.summary for a in entry.actions) or "kept"
        origin = ", ".join(entry.sources) if entry.sources != (entry.name,) else ""
        rows.append(
            (
                entry.name,
                str(entry.shape),
                entry.dtype,
                what,
                f"<- {origin}" if origin else "",
            )
        )
    console.print(columns(rows), markup=False, highlight=False)
    for name, reason in report.dropped.items():
        console.print(f"dropped {name}  ({reason})")
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
