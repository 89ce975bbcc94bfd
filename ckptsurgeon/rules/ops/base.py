"""What every op shares: the :class:`Op` base class, :class:`TensorOp` for ops that replace
each selected tensor by a function of it, the :class:`Context` a rules file runs in, the
registry (``OPS`` and ``@register``) and the helpers that build tables and check name
templates.

The registry lives here rather than in the package's ``__init__`` so that each family
module can register its ops without importing the package that imports it.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import Pattern, Strict
from ckptsurgeon.rules.patterns import show_pattern

if TYPE_CHECKING:
    from ckptsurgeon.formats.table import Table, TensorRef
    from ckptsurgeon.targets.spec import TargetInfo


@dataclass
class Context:
    """What ops share while a rules file runs."""

    seed: int = 0
    target: TargetInfo | None = None
    dropped: dict[str, str] = field(default_factory=dict)  # name -> why
    where: str = ""  # "rule 3 (rename)", for messages
    base_dir: str = ""  # relative paths in op fields (a merge_lora adapter) resolve here
    # The rules file's named `sources:`, each opened on first use (take, average).
    sources: Mapping[str, Table] = field(default_factory=dict)


OPS: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
    OPS[cls.model_fields["op"].default] = cls
    return cls


class Op(Strict):
    """Base class: ``optional`` plus the no-match check every op shares."""

    optional: bool = Field(False, description="allow this op to match no key")
    verb: ClassVar[str] = ""
    needs_target: ClassVar[bool] = False  # takes fresh values from the rules file's target

    def run(self, table: Table, ctx: Context) -> Table:
        """Run the op over ``table``, failing (FitError) when it matched nothing and is not
        optional."""
        out, matched = self.rewrite(table, ctx)
        if matched == 0 and not self.optional:
            raise FitError(
                f"{ctx.where}: {self.describe_selector()} matched no key "
                "(add optional: true if that is expected)"
            )
        return out

    @abstractmethod  # pydantic's model metaclass is an ABCMeta: an op without it cannot be built
    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        """The new table and how many keys the op matched."""

    def describe_selector(self) -> str:
        pattern = getattr(self, "pattern", None)
        return f"pattern {show_pattern(pattern)}" if pattern else "the op"

    def input_files(self, base_dir: str) -> list[str]:
        """Files or folders the op reads besides the source (the up-to-date record lists
        them, and the output may not overwrite them)."""
        return []

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(getattr(self, "pattern", None) or "")


def build_table(entries: Iterable[tuple[str, TensorRef, str]], ctx: Context) -> Table:
    """Assemble ``(name, ref, origin)`` entries into a table, in order.

    Two entries landing on one name is an error that names both origins.
    """
    out: Table = {}
    origin: dict[str, str] = {}
    for name, ref, source in entries:
        if name in out:
            raise FitError(f"{ctx.where}: {origin[name]!r} and {source!r} both become {name!r}")
        out[name] = ref
        origin[name] = source
    return out


def rename_keys(
    table: Table, ctx: Context, new_name: Callable[[str], str | None], verb: str
) -> tuple[Table, int]:
    """Rename every key for which ``new_name`` returns a new name; order is kept."""
    entries = []
    matched = 0
    for name, ref in table.items():
        target = new_name(name)
        if target is not None and target != name:
            matched += 1
            entries.append((target, ref.with_action(Action(verb, sources=(name,))), name))
        else:
            entries.append((name, ref, name))
    return build_table(entries, ctx), matched


class TensorOp(Op):
    """An op that replaces each matching tensor by a function of it."""

    pattern: Pattern

    @abstractmethod
    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        """The op's new value for one selected tensor."""

    def selects(self, name: str, ref: TensorRef) -> bool:
        return bool(self.regex.search(name))

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        out: Table = {}
        matched = 0
        for name, ref in table.items():
            if self.selects(name, ref):
                matched += 1
                try:
                    ref = self.transform(name, ref, ctx)
                except FitError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError, OverflowError) as exc:
                    raise FitError(f"{ctx.where}: {name!r} {list(ref.shape)}: {exc}") from None
            out[name] = ref
        return out, matched


def check_template(pattern: str, template: str) -> None:
    """ValueError if ``template`` refers to a group ``pattern`` does not have (caught when
    the rules file is validated, not when a key first matches)."""
    try:
        re.compile(pattern).sub(template, "")  # parses the template even with no match
    except (re.error, IndexError) as exc:
        raise ValueError(f"template {show_pattern(template)}: {exc}") from None
