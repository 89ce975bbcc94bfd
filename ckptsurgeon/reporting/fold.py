"""Folding names that differ only in layer indices into one row (``apply``'s plan, ``inspect``).

``model.layers.0.mlp.up_proj.weight`` ... ``model.layers.31.mlp.up_proj.weight`` become one
row, ``model.layers.{0..31}.mlp.up_proj.weight`` with a count of 32; see :func:`fold_rows`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_INDEX = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class Folded(Generic[T]):
    """One folded row: the name pattern, the source patterns, and the items it stands for
    (in their input order)."""

    name: str
    sources: tuple[str, ...]
    members: tuple[T, ...]

    @property
    def count(self) -> int:
        return len(self.members)


def fold_rows(
    items: Iterable[T],
    name: Callable[[T], str],
    key: Callable[[T], Hashable] = lambda _: None,
    sources: Callable[[T], Sequence[str]] | None = None,
) -> list[Folded[T]]:
    """Fold ``items`` whose names differ only in layer indices into one :class:`Folded` row.

    A name is split on ``.``; a segment that is a non-negative integer written without
    leading zeros (``0``, ``7``, ``31``; not ``01``, not ``layer1``) is an *index*; the
    other segments, and the number and places of the indices, are the name's *template*.

    Two items can share a row only when their names have the same template, ``key(item)``
    is equal (the caller puts shape, dtype, action... there), and their ``sources`` (when
    given) have the same number of names, pairwise of the same template, and fold *the same
    way* as the name: each index of a source must be, across the row, either one constant
    value or the value of one index of the name plus one constant offset (the index at
    the same place in the name is tried first, then the others in order). Where neither
    holds, the items are told apart by that source index's value.

    Within such a group, rows start as one per item; rows whose index values agree at every
    position but one are merged at that one (its values united), position by position from
    the last to the first, repeated until nothing changes. So every row stands for exactly
    the full product of its positions' value sets: no pattern names a key that is not among
    its members (``a.0.b.0`` and ``a.1.b.1`` stay two rows).

    In a pattern, an index position that holds one value is that value; one that varies is
    ``{a..b}`` when its values are contiguous and ``{0,2,5}`` otherwise, where a run of
    three or more consecutive values inside the braces is written ``a..b`` too
    (``{0..3,7}``). A source index tied to a name index is written with that index's values
    plus the offset. Rows are returned in the order of their first member in ``items``.
    """
    parsed = [
        _Item.parse(i, item, name(item), sources(item) if sources else ())
        for i, item in enumerate(items)
    ]
    groups: dict[Hashable, list[_Item[T]]] = {}
    for p in parsed:
        groups.setdefault((key(p.item), p.template, p.source_templates), []).append(p)
    rows: list[tuple[int, Folded[T]]] = []
    for members in groups.values():
        for tied, part in _tie_sources(members, 0):
            rows.extend(_merge(part, tied))
    rows.sort(key=lambda r: r[0])
    return [row for _, row in rows]


# A source index, decided for a whole row: (None, value) for a constant, or
# (name index position, offset) for one that follows the name.
_Tie = tuple[int | None, int]


@dataclass
class _Item(Generic[T]):
    """One item, its name and its sources cut into segments, templates and indices."""

    index: int
    item: T
    segments: list[str]
    template: tuple[str | None, ...]
    ints: tuple[int, ...]
    sources: list[list[str]]
    source_templates: tuple[tuple[str | None, ...], ...]
    source_ints: tuple[int, ...]
    # For each of source_ints: (which source, its place among that source's indices).
    source_places: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, index: int, item: T, name: str, sources: Sequence[str]) -> _Item[T]:
        segments, template, ints = _split(name)
        split = [_split(s) for s in sources]
        return cls(
            index,
            item,
            segments,
            template,
            ints,
            [s[0] for s in split],
            tuple(s[1] for s in split),
            tuple(v for s in split for v in s[2]),
            tuple((n, k) for n, s in enumerate(split) for k in range(len(s[2]))),
        )


def _split(name: str) -> tuple[list[str], tuple[str | None, ...], tuple[int, ...]]:
    segments = name.split(".")
    template = tuple(None if _INDEX.fullmatch(s) else s for s in segments)
    ints = tuple(int(s) for s in segments if _INDEX.fullmatch(s))
    return segments, template, ints


def _tie_sources(
    members: list[_Item[T]], j: int, tied: tuple[_Tie, ...] = ()
) -> list[tuple[tuple[_Tie, ...], list[_Item[T]]]]:
    """Decide source index ``j`` onwards for ``members``; split them where one can't be."""
    if not members or j == len(members[0].source_ints):
        return [(tied, members)]
    values = [m.source_ints[j] for m in members]
    if len(set(values)) == 1:
        return _tie_sources(members, j + 1, (*tied, (None, values[0])))
    place = members[0].source_places[j][1]
    width = len(members[0].ints)
    for k in ([place] if place < width else []) + [k for k in range(width) if k != place]:
        offsets = {m.source_ints[j] - m.ints[k] for m in members}
        if len(offsets) == 1:
            return _tie_sources(members, j + 1, (*tied, (k, offsets.pop())))
    by_value: dict[int, list[_Item[T]]] = {}
    for m, v in zip(members, values, strict=True):
        by_value.setdefault(v, []).append(m)
    return [out for part in by_value.values() for out in _tie_sources(part, j, tied)]


def _merge(members: list[_Item[T]], tied: tuple[_Tie, ...]) -> list[tuple[int, Folded[T]]]:
    """Merge along one index position at a time; every entry stays a full product."""
    entries: list[tuple[tuple[frozenset[int], ...], list[_Item[T]]]] = [
        (tuple(frozenset((v,)) for v in m.ints), [m]) for m in members
    ]
    width = len(members[0].ints)
    changed = True
    while changed:
        changed = False
        for p in reversed(range(width)):
            merged: dict[tuple[frozenset[int], ...], tuple[set[int], list[_Item[T]]]] = {}
            for sets, items in entries:
                rest = sets[:p] + sets[p + 1 :]
                if rest in merged:
                    merged[rest][0].update(sets[p])
                    merged[rest][1].extend(items)
                    changed = True
                else:
                    merged[rest] = (set(sets[p]), list(items))
            entries = [
                ((*rest[:p], frozenset(vals), *rest[p:]), items)
                for rest, (vals, items) in merged.items()
            ]
    out = []
    for sets, items in entries:
        items.sort(key=lambda m: m.index)
        first = items[0]
        name = _fill(first.segments, first.template, [_braces(s) for s in sets])
        sources = []
        for n, segments in enumerate(first.sources):
            filled = [
                str(offset) if k is None else _braces(sets[k], offset)
                for (k, offset), (source, _) in zip(tied, first.source_places, strict=True)
                if source == n
            ]
            sources.append(_fill(segments, first.source_templates[n], filled))
        out.append((first.index, Folded(name, tuple(sources), tuple(m.item for m in items))))
    return out


def _fill(segments: list[str], template: tuple[str | None, ...], values: list[str]) -> str:
    it = iter(values)
    return ".".join(
        s if t is not None else next(it) for s, t in zip(segments, template, strict=True)
    )


def _braces(values: Iterable[int], offset: int = 0) -> str:
    """``{a..b}`` for a contiguous set, ``{0,2,5}`` (runs of 3+ as ``a..b``) otherwise."""
    vs = sorted(v + offset for v in values)
    if len(vs) == 1:
        return str(vs[0])
    runs: list[list[int]] = []
    for v in vs:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    if len(runs) == 1:
        return f"{{{vs[0]}..{vs[-1]}}}"
    parts = []
    for run in runs:
        parts += [f"{run[0]}..{run[-1]}"] if len(run) >= 3 else [str(v) for v in run]
    return "{" + ",".join(parts) + "}"


def cover(names: Iterable[str], others: Iterable[str] = ()) -> list[str]:
    """Patterns that name exactly ``names`` among ``names`` and ``others`` (a plan's summary:
    the keys one action was applied to, told apart from every other key); see
    :meth:`NameTree.cover`, which answers many such questions about one set of keys."""
    wanted = list(names)
    return NameTree([*wanted, *others]).cover(wanted)


class NameTree:
    """Dotted names as a tree of their prefixes, each prefix knowing how many names are
    under it: built once, then :meth:`cover` for any subset costs that subset's size."""

    def __init__(self, names: Iterable[str]) -> None:
        self.root = _Node()
        for name in dict.fromkeys(names):
            node = self.root
            node.total += 1
            for segment in name.split("."):
                node = node.children.setdefault(segment, _Node())
                node.total += 1
            node.name = name

    def cover(self, names: Iterable[str]) -> list[str]:
        """Patterns that name exactly ``names`` among this tree's names (all of ``names``
        must be in it).

        Each pattern is a dotted prefix followed by ``.*`` under which every name is one of
        ``names`` (the shortest such prefix), or a whole name where that prefix would hold
        just that one name. Patterns are then folded by layer index (:func:`fold_rows`), a
        number at the end of a segment included (``layer{1..4}.*``), so each stands for
        exactly the names it covers. When ``names`` are every name, the top-level prefixes
        are listed rather than one ``*``. Patterns keep the order of the tree's names.
        """
        inside: dict[int, int] = {}
        wanted: set[int] = set()
        for name in dict.fromkeys(names):
            node = self.root
            inside[id(node)] = inside.get(id(node), 0) + 1
            for segment in name.split("."):
                node = node.children[segment]
                inside[id(node)] = inside.get(id(node), 0) + 1
            wanted.add(id(node))
        found: list[str] = []
        root = self.root
        if root.total and inside.get(id(root)) == root.total:
            if root.name is not None:
                found.append(root.name)
            for segment, child in root.children.items():
                child.collect(segment, found, inside, wanted)
        else:
            root.collect("", found, inside, wanted)
        marked = [_TRAILING.sub(lambda m: _JOIN + "." + m.group(1), p) for p in found]
        return [row.name.replace(_JOIN + ".", "") for row in fold_rows(marked, name=lambda p: p)]


# A name segment that ends in a number after a non-digit (``layer1``, ``blocks12``), split
# for folding as if the number were a segment of its own: ``layer\0.1``.
_TRAILING = re.compile(r"(?<=[^0-9.])(0|[1-9][0-9]*)(?=\.|$)")
_JOIN = "\0"


class _Node:
    """A prefix in a :class:`NameTree`: the names under it, and the one that ends here."""

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.name: str | None = None
        self.total = 0

    def collect(self, prefix: str, out: list[str], inside: dict[int, int], wanted: set[int]):
        count = inside.get(id(self), 0)
        if not count:
            return
        if count == self.total:
            if self.total == 1:
                node = self
                while node.name is None:
                    (node,) = node.children.values()
                out.append(node.name)
                return
            if self.name is not None:
                out.append(self.name)
            out.append(f"{prefix}.*")
            return
        if id(self) in wanted and self.name is not None:
            out.append(self.name)
        for segment, child in self.children.items():
            child.collect(f"{prefix}.{segment}" if prefix else segment, out, inside, wanted)
