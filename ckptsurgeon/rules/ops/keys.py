"""Ops on names: renames (strip_prefix, add_prefix, rename, map), selection (drop, keep) and
copies (copy). They move refs from name to name and never touch tensor data."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import Pattern
from ckptsurgeon.rules.ops.base import (
    Context,
    Op,
    build_table,
    check_template,
    register,
    rename_keys,
)
from ckptsurgeon.rules.patterns import show_pattern

if TYPE_CHECKING:
    from ckptsurgeon.formats.table import Table


@register
class StripPrefix(Op):
    """Remove ``prefix`` from every key that starts with it."""

    op: Literal["strip_prefix"] = "strip_prefix"
    prefix: str = Field(min_length=1)

    def describe_selector(self) -> str:
        return f"prefix {self.prefix!r}"

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        return rename_keys(
            table,
            ctx,
            lambda n: n[len(self.prefix) :] if n.startswith(self.prefix) else None,
            "stripped",
        )


@register
class AddPrefix(Op):
    """Prepend ``prefix`` to every key (or to the keys matching ``pattern``)."""

    op: Literal["add_prefix"] = "add_prefix"
    prefix: str = Field(min_length=1)
    pattern: Pattern | None = None

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        return rename_keys(
            table,
            ctx,
            lambda n: self.prefix + n if self.regex.search(n) else None,
            "prefixed",
        )


class _Substitution(Op):
    """An op that names its new keys ``re.sub(pattern, replace, key)``."""

    pattern: Pattern
    replace: str

    @model_validator(mode="after")
    def _template_fits(self) -> _Substitution:
        check_template(self.pattern, self.replace)
        return self


@register
class Rename(_Substitution):
    """Regex rename: ``re.sub(pattern, replace, key)`` on every matching key."""

    op: Literal["rename"] = "rename"

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        def new(name: str) -> str | None:
            return self.regex.sub(self.replace, name) if self.regex.search(name) else None

        try:
            return rename_keys(table, ctx, new, "renamed")
        except (re.error, IndexError) as exc:
            raise FitError(
                f"{ctx.where}: replacement {show_pattern(self.replace)}: {exc}"
            ) from None


@register
class Map(Op):
    """Explicit renames, ``{old: new}``; every old name must exist unless optional."""

    op: Literal["map"] = "map"
    mapping: dict[str, str] = Field(min_length=1)

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        absent = [old for old in self.mapping if old not in table]
        if absent and not self.optional:
            raise FitError(
                f"{ctx.where}: {len(absent)} mapped keys are not in the checkpoint: "
                f"{', '.join(map(repr, absent[:5]))}"
            )
        return rename_keys(table, ctx, self.mapping.get, "mapped")


@register
class Drop(Op):
    """Remove every key that matches ``pattern``."""

    op: Literal["drop"] = "drop"
    pattern: Pattern

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        gone = [n for n in table if self.regex.search(n)]
        ctx.dropped.update(
            dict.fromkeys(gone, f"{ctx.where}: matches {show_pattern(self.pattern)}")
        )
        return {n: r for n, r in table.items() if n not in set(gone)}, len(gone)


@register
class Keep(Op):
    """Remove every key that does not match ``pattern``."""

    op: Literal["keep"] = "keep"
    pattern: Pattern

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        kept = {n: r for n, r in table.items() if self.regex.search(n)}
        ctx.dropped.update(
            {
                n: f"{ctx.where}: does not match {show_pattern(self.pattern)}"
                for n in table
                if n not in kept
            }
        )
        return kept, len(kept)


@register
class Copy(_Substitution):
    """Duplicate matching keys under ``re.sub(pattern, replace, key)`` (tied weights)."""

    op: Literal["copy"] = "copy"

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        entries = [(name, ref, name) for name, ref in table.items()]
        copies = [
            (
                self.regex.sub(self.replace, name),
                ref.with_action(Action("copied", sources=(name,))),
                name,
            )
            for name, ref in table.items()
            if self.regex.search(name)
        ]
        return build_table(entries + copies, ctx), len(copies)
