"""Safe YAML that remembers where each value came from, so errors can name the line.

PyYAML's safe loader is used to compose the node graph; we build plain Python values from
it ourselves to (a) record the line and column of every node by its path, (b) refuse
duplicate keys, which YAML forbids but PyYAML silently accepts, and (c) bound the work an
alias bomb could cause.

Parsing is bounded before any tree is built: a first pass over the parser's events (flat,
not recursive, libyaml's C parser where installed) stops at the first event past the node
or depth limit, so a hostile file of any shape is refused in well under a second and a
deeply nested one never reaches the recursive composer.
"""

from __future__ import annotations

from typing import Any

import yaml

from ckptsurgeon.errors import RulesError

MAX_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 64

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NODE_EVENTS = (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent, yaml.AliasEvent)
_OPEN_EVENTS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE_EVENTS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)

Path = tuple[Any, ...]


class Located:
    """A parsed YAML document plus the (line, column) of every node, keyed by path."""

    def __init__(self, filename: str, value: Any, marks: dict[Path, tuple[int, int]]) -> None:
        self.filename = filename
        self.value = value
        self.marks = marks

    def where(self, loc: Path) -> str:
        """``file:line:col`` of the deepest node on ``loc`` that exists."""
        for cut in range(len(loc), -1, -1):
            mark = self.marks.get(tuple(loc[:cut]))
            if mark:
                return f"{self.filename}:{mark[0]}:{mark[1]}"
        return self.filename


def parse(text: str, filename: str) -> Located:
    """Parse one YAML document safely, recording node positions."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise RulesError(f"{filename}: larger than {MAX_BYTES} bytes; not a rules file")
    try:
        _bound(text, filename)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = getattr(exc, "problem", None) or str(exc)
        raise RulesError(f"{where}: invalid YAML: {problem}") from None
    marks: dict[Path, tuple[int, int]] = {}
    if node is None:
        return Located(filename, None, marks)
    builder = _Builder(filename, marks)
    return Located(filename, builder.build(node, ()), marks)


def _bound(text: str, filename: str) -> None:
    """Refuse a document with too many nodes or too deep a nesting, from its events."""
    nodes = depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, _NODE_EVENTS):
            nodes += 1
        if isinstance(event, _OPEN_EVENTS):
            depth += 1
        elif isinstance(event, _CLOSE_EVENTS):
            depth -= 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            m = event.start_mark
            what = (
                f"more than {MAX_NODES} values"
                if nodes > MAX_NODES
                else (f"nested deeper than {MAX_DEPTH} levels")
            )
            raise RulesError(f"{filename}:{m.line + 1}:{m.column + 1}: {what}")


class _Builder:
    def __init__(self, filename: str, marks: dict[Path, tuple[int, int]]) -> None:
        self.filename = filename
        self.marks = marks
        self.count = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def _fail(self, node: yaml.Node, message: str) -> RulesError:
        m = node.start_mark
        return RulesError(f"{self.filename}:{m.line + 1}:{m.column + 1}: {message}")

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self._fail(node, f"more than {MAX_NODES} values (an alias bomb?)")
        if len(path) > MAX_DEPTH:
            raise self._fail(node, f"nested deeper than {MAX_DEPTH} levels")
        self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, (*path, "<key>"))
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise self._fail(key_node, "mapping keys must be plain values")
                if key in out:
                    raise self._fail(key_node, f"duplicate key {key!r}")
                self.marks[(*path, key)] = (
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self._fail(node, f"invalid value: {exc}") from None
