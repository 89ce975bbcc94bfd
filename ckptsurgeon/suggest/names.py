"""Dotted tensor names: segments, layer indices, and regexes that pick exactly a set of them.

Everything here works on whole dotted segments (``layer1.0.conv1.weight`` is
``layer1 | 0 | conv1 | weight``), never on characters: ``layer1.`` must not match ``layer10.``.
A segment made only of ASCII digits is a layer index (a ``ModuleList``/``Sequential``
position), the one thing a pattern may generalise.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

INDEX = r"(\d+)"


def is_index(segment: str) -> bool:
    """``"12"`` -> True: a ``ModuleList``/``Sequential`` position."""
    return segment.isascii() and segment.isdigit()


def prefix_segments(prefix: str) -> list[str]:
    """``"backbone.body."`` -> ``["backbone", "body"]``; ``""`` -> ``[]``."""
    return prefix.split(".")[:-1] if prefix else []


def indices(prefix: str) -> tuple[str, ...]:
    """The layer indices in a prefix, in order: ``"blocks.3.attn."`` -> ``("3",)``."""
    return tuple(s for s in prefix_segments(prefix) if is_index(s))


def skeleton(prefix: str) -> str:
    """A prefix with its layer indices blanked: ``"blocks.3.attn."`` -> ``"blocks.#.attn."``."""
    return "".join(("#" if is_index(s) else s) + "." for s in prefix_segments(prefix))


def escape(segments: Sequence[str], *, generalise: bool = False) -> str:
    r"""Segments as a regex joined by ``\.``; with ``generalise``, indices become ``(\d+)``."""
    return r"\.".join(INDEX if generalise and is_index(s) else re.escape(s) for s in segments)


def prefix_regex(prefix: str, *, generalise: bool = False) -> str:
    r"""``"blocks.3."`` -> ``'^blocks\.3\.'`` (or ``'^blocks\.(\d+)\.'`` when generalising)."""
    return "^" + escape(prefix_segments(prefix), generalise=generalise) + r"\."


def prefix_replacement(prefix: str, *, generalise: bool = False) -> str:
    r"""The ``re.sub`` replacement writing ``prefix``; with ``generalise`` its indices become
    ``\g<1>``, ``\g<2>``... in order (``\g<n>``, so a digit after it is not read as ``\10``)."""
    out: list[str] = []
    group = 0
    for segment in prefix_segments(prefix):
        if generalise and is_index(segment):
            group += 1
            out.append(rf"\g<{group}>")
        else:
            out.append(segment.replace("\\", "\\\\"))
    return "".join(part + "." for part in out)


def glob(prefix: str, *, generalise: bool = False) -> str:
    """How a person writes a family of keys: ``"blocks.3."`` -> ``"blocks.N.*"``."""
    segments = prefix_segments(prefix)
    return ".".join("N" if generalise and is_index(s) else s for s in segments) + ".*"


def split_prefixes(name: str) -> Iterable[tuple[str, str]]:
    """Every way to cut ``name`` into (dotted prefix, rest) with a non-empty rest:
    ``"a.b.c"`` -> ``("", "a.b.c"), ("a.", "b.c"), ("a.b.", "c")``."""
    segments = name.split(".")
    for depth in range(len(segments)):
        yield ".".join(segments[:depth]) + "." if depth else "", ".".join(segments[depth:])


@dataclass(frozen=True)
class Group:
    """A regex that, among the names it was built for, matches exactly ``names``."""

    pattern: str  # for re.search
    label: (
        str  # how a person writes it: "rpn.head.*", "layers.N.attn.bias", "*.num_batches_tracked"
    )
    names: tuple[str, ...]


def cover(selected: Sequence[str], others: Collection[str]) -> list[Group]:
    """Few, readable regexes that together match every name in ``selected`` and no name
    in ``others``.

    Each name offers three patterns: the shortest whole-segment prefix that no other name
    shares (``^rpn\\.``), the same with layer indices generalised (``^h\\.\\d+\\.attn\\.bias$``),
    and its leaf when no other name ends with it (``(?:^|\\.)num_batches_tracked$``). The
    patterns covering the most names still uncovered are taken first (a module path before
    a leaf when they tie), so each group's
    ``names`` are those it adds; every group matches at least one name the earlier ones did
    not, which is what a sequence of ``drop`` rules needs (an op matching nothing fails).
    """
    other_prefixes = {p for name in others for p, _ in split_prefixes(name) if p}
    other_leaves = {name.rsplit(".", 1)[-1] for name in others}
    offers: dict[str, str] = {}  # pattern -> label, in the order they were found
    for name in selected:
        for pattern, label in _offers(name, other_prefixes, other_leaves):
            offers.setdefault(pattern, label)

    matches: dict[str, list[str]] = {}
    for pattern in offers:
        regex = re.compile(pattern)
        # Prefix patterns exclude ``others`` by construction; the rest must be checked.
        checked = pattern.endswith("$") or "\\d" in pattern
        if checked and any(regex.search(o) for o in others):
            continue
        matches[pattern] = [n for n in selected if regex.search(n)]

    groups: list[Group] = []
    left = set(selected)
    while left:
        # Most names first; on a tie a pattern anchored at the start (a module path)
        # before a leaf pattern, which would also catch that leaf anywhere else.
        best = max(
            matches,
            key=lambda p: (len(left.intersection(matches[p])), p.startswith("^"), -len(p)),
        )
        added = tuple(n for n in matches[best] if n in left)
        groups.append(Group(best, offers[best], added))
        left.difference_update(added)
    return groups


def _offers(
    name: str, other_prefixes: set[str], other_leaves: set[str]
) -> Iterable[tuple[str, str]]:
    """The candidate patterns for one name (see :func:`cover`)."""
    segments = name.split(".")
    cut = next(
        (d for d in range(1, len(segments)) if ".".join(segments[:d]) + "." not in other_prefixes),
        len(segments),
    )
    head = segments[:cut]
    end = r"\." if cut < len(segments) else "$"
    suffix = ".*" if cut < len(segments) else ""
    yield "^" + escape(head) + end, ".".join(head) + suffix
    if any(is_index(s) for s in head):
        label = ".".join("N" if is_index(s) else s for s in head) + suffix
        yield "^" + escape(head, generalise=True).replace(INDEX, r"\d+") + end, label
    leaf = segments[-1]
    if len(segments) > 1 and leaf not in other_leaves:
        yield r"(?:^|\.)" + re.escape(leaf) + "$", "*." + leaf


def one_pattern(groups: Sequence[Group]) -> str:
    """The groups' patterns as one regex (an alternation when there are several)."""
    if len(groups) == 1:
        return groups[0].pattern
    return "(?:" + "|".join(g.pattern for g in groups) + ")"


def labels(groups: Sequence[Group]) -> str:
    """``"rpn.head.*, roi_heads.*"``."""
    return ", ".join(g.label for g in groups)


def module_of(name: str) -> str:
    """``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"`` (``""`` at the top level)."""
    return name.rpartition(".")[0]


def role(module: str) -> str | None:
    """Which attention projection a module name denotes: ``"q_proj"`` -> ``"q"``,
    ``"value"`` -> ``"v"``; None when it names none or several."""
    tokens = {t.lower() for t in re.split(r"[_\W]+|(?<=[a-z])(?=[A-Z])", module)}
    found = {r for r, words in ROLE_WORDS.items() if tokens & words}
    return found.pop() if len(found) == 1 else None


ROLE_WORDS = {
    "q": {"q", "query", "wq"},
    "k": {"k", "key", "wk"},
    "v": {"v", "value", "wv"},
}


def mentions_ema(prefix: str) -> bool:
    """``"model_ema."`` -> True: a prefix naming an exponential-moving-average copy."""
    return re.search(r"(?:^|[._])ema(?:[._]|$)", prefix.lower()) is not None
