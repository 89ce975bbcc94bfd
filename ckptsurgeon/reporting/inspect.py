"""``inspect``: what is in a checkpoint, as the SPEC's JSON object or as tables."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from ckptsurgeon.formats import registry
from ckptsurgeon.formats.checkpoint import show_containers
from ckptsurgeon.formats.dtypes import dtype_name
from ckptsurgeon.reporting.fold import fold_rows
from ckptsurgeon.reporting.text import columns, human_bytes, human_count

if TYPE_CHECKING:
    from rich.console import Console

    from ckptsurgeon.formats.checkpoint import Checkpoint


def summarize(ckpt: Checkpoint, pattern: str | None = None) -> dict[str, Any]:
    """The ``inspect --json`` object (also a valid ``target.manifest``).

    Torch-free: ``ckpt`` may hold lazy tensor refs or safetensors header records
    (:class:`~ckptsurgeon.formats.header_table.HeaderTensor`), as both have ``shape``,
    ``dtype``, ``numel`` and ``nbytes``."""
    regex = re.compile(pattern) if pattern else None
    tensors = {
        name: {"shape": list(ref.shape), "dtype": dtype_name(ref.dtype), "bytes": ref.nbytes}
        for name, ref in ckpt.tensors.items()
        if regex is None or regex.search(name)
    }
    summary: dict[str, Any] = {
        "format": ckpt.format,
        "path": ckpt.path,
        "tensors": tensors,
        "total_bytes": sum(t["bytes"] for t in tensors.values()),
        "num_params": sum(ckpt.tensors[n].numel for n in tensors),
        "containers": ckpt.containers,
        "container": ckpt.container,
        "note": ckpt.note,
        "metadata": ckpt.metadata,
        "aliases": ckpt.aliases,
    }
    summary.update(registry.describe(ckpt))  # what the format adds (GGUF: what is stored)
    return summary


def prefix_tree(names_sizes: dict[str, tuple[int, int]], depth: int = 2) -> dict[str, list[int]]:
    """Group ``name -> (numel, bytes)`` by their first ``depth`` dotted segments."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, (numel, nbytes) in names_sizes.items():
        parts = name.split(".")
        for d in range(1, min(depth, len(parts) - 1) + 1):
            g = groups[".".join(parts[:d])]
            g[0] += 1
            g[1] += numel
            g[2] += nbytes
    return dict(groups)


#: ``inspect`` lists every tensor up to this many; past it, rows are folded by layer index.
SCREENFUL = 40


def render(summary: dict[str, Any], console: Console, show_all: bool = False) -> None:
    """Print the human form of a :func:`summarize` object.

    Up to :data:`SCREENFUL` tensors (or with ``show_all``, ``inspect --all``) every name gets
    a line; past that, names that differ only in a layer index with the same shape and dtype
    share one (:func:`~ckptsurgeon.reporting.fold.fold_rows`), with their count and bytes.
    """
    from rich.tree import Tree

    tensors = summary["tensors"]
    if "safetensors" in summary["format"]:
        # safetensors stores tensors widest dtype first, then by name (its reference writer's
        # layout, which ours matches byte for byte): in file order every int64 buffer would
        # lead. By name, each module's tensors sit together, layers in numeric order.
        tensors = dict(sorted(tensors.items(), key=lambda item: _natural(item[0])))
    console.print(f"[bold]{summary['path']}[/]  format: {summary['format']}")
    if [c for c in summary["containers"] if c]:
        console.print(
            f"containers: {show_containers(summary['containers'])}", markup=False, highlight=False
        )
    if summary["note"]:
        console.print(f"state dict: {summary['note']}")
    if "quantization" in summary:
        stored = ", ".join(f"{t} x{n}" for t, n in summary["quantization"].items())
        console.print(
            f"architecture: {summary['architecture'] or '?'}; stored as {stored or 'nothing'} "
            "(dequantized on read)",
            markup=False,
            highlight=False,
        )
    if show_all or len(tensors) <= SCREENFUL:
        rows = [
            (name, str(tuple(i["shape"])), i["dtype"], human_bytes(i["bytes"]))
            for name, i in tensors.items()
        ]
        console.print(columns(rows), markup=False, highlight=False)
    else:
        folded = fold_rows(
            tensors.items(),
            name=lambda t: t[0],
            key=lambda t: (tuple(t[1]["shape"]), t[1]["dtype"]),
        )
        rows = []
        for row in folded:
            info = row.members[0][1]
            total = sum(i["bytes"] for _, i in row.members)
            rows.append(
                (
                    row.name,
                    str(tuple(info["shape"])),
                    info["dtype"],
                    f"x{row.count}" if row.count > 1 else "",
                    human_bytes(total),
                )
            )
        console.print(columns(rows), markup=False, highlight=False)
        if len(folded) < len(tensors):
            console.print(
                f"({len(tensors)} tensors in {len(folded)} rows, layer indices folded, "
                "bytes per row; --all lists every name)",
                markup=False,
                highlight=False,
            )
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for info in tensors.values():
        by_dtype[info["dtype"]][0] += 1
        by_dtype[info["dtype"]][1] += info["bytes"]
    totals = ", ".join(f"{d}: {c} tensors {human_bytes(b)}" for d, (c, b) in by_dtype.items())
    console.print(
        f"\n[bold]{len(tensors)} tensors[/], {human_count(summary['num_params'])} parameters "
        f"({summary['num_params']}), {human_bytes(summary['total_bytes'])}  \\[{totals}]"
    )
    sizes = {n: (_numel(i["shape"]), i["bytes"]) for n, i in tensors.items()}
    groups = prefix_tree(sizes)
    if groups:
        tree = Tree("prefixes")
        nodes: dict[str, Tree] = {}
        for prefix in groups:  # a parent prefix is always inserted before its children
            count, numel, _ = groups[prefix]
            parent = nodes.get(prefix.rsplit(".", 1)[0], tree) if "." in prefix else tree
            nodes[prefix] = parent.add(f"{prefix}.*  {count} tensors, {human_count(numel)} params")
        console.print(tree)
    if summary["aliases"]:
        for name, other in summary["aliases"].items():
            console.print(f"alias: {name} shares storage with {other}")


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    """``layer10`` after ``layer2``: digit runs compare as numbers."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
