"""The human form of an ``apply`` report: every output key and what happened to it."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from ckptsurgeon.reporting.text import columns, human_bytes


def render(report: dict[str, Any], console: Console) -> None:
    src = report["source"]
    console.print(
        f"source: {src['path']} ({src['format']}"
        + (f", {src['note']}" if src.get("note") else "")
        + ")"
    )
    if report["target"]:
        console.print(f"target: {report['target']}")
    rows = []
    for entry in report["keys"]:
        what = "; ".join(a.split(" from ", 1)[0] for a in entry["actions"])
        origin = ", ".join(entry["sources"]) if entry["sources"] != [entry["name"]] else ""
        rows.append(
            (
                entry["name"],
                str(tuple(entry["shape"])),
                entry["dtype"],
                what,
                f"<- {origin}" if origin else "",
            )
        )
    console.print(columns(rows), markup=False, highlight=False)
    for dropped in report["dropped"]:
        console.print(f"dropped {dropped['name']}  ({dropped['reason']})")
    counts = report["counts"]
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
    console.print(", ".join(shown) + f"; {human_bytes(report['total_bytes'])}")
    check = report.get("check")
    if check:
        console.print(
            f"check against {check['target']}: "
            + ("[green]loads strictly[/]" if check["ok"] else "[red]FAILS[/]")
        )
        for d in check["dtype_mismatch"][:5]:
            console.print(f"  dtype {d['name']}: {d['checkpoint']} -> {d['target']} on load")
    if report["dry_run"]:
        console.print(
            f"dry run: nothing written (would write {report['output'] or '(no output set)'})"
        )
    elif report.get("written"):
        w = report["written"]
        console.print(f"wrote {w['path']} ({len(w['files'])} file(s), {human_bytes(w['bytes'])})")
