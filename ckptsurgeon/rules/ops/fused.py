"""Fused layouts: one tensor into several along a dimension (split: qkv -> q, k, v) and
several into one (merge: q, k, v -> qkv), named by the pattern's groups."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, PositiveInt, model_validator

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import Pattern
from ckptsurgeon.rules.ops.base import Context, Op, build_table, check_template, register
from ckptsurgeon.rules.patterns import show_pattern

if TYPE_CHECKING:
    from ckptsurgeon.formats.table import Table, TensorRef


def _expand(match: re.Match[str], template: str, ctx: Context) -> str:
    try:
        return match.expand(template)
    except (re.error, IndexError) as exc:
        raise FitError(f"{ctx.where}: template {show_pattern(template)}: {exc}") from None


@register
class Split(Op):
    """One tensor into several along ``dim`` (fused qkv -> q, k, v). ``into`` holds one name
    template per part, using the pattern's groups; ``sizes`` defaults to equal parts."""

    op: Literal["split"] = "split"
    pattern: Pattern
    into: list[str] = Field(min_length=2)
    dim: int = 0
    sizes: list[PositiveInt] | None = None

    @model_validator(mode="after")
    def _sizes_match(self) -> Split:
        if self.sizes is not None and len(self.sizes) != len(self.into):
            raise ValueError(f"sizes has {len(self.sizes)} entries but into has {len(self.into)}")
        for template in self.into:
            check_template(self.pattern, template)
        return self

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        entries = []
        matched = 0
        for name, ref in table.items():
            match = self.regex.search(name)
            if not match:
                entries.append((name, ref, name))
                continue
            matched += 1
            start = 0
            for template, size in zip(self.into, self._sizes(name, ref, ctx), strict=True):
                part = ref.narrow(
                    self.dim,
                    start,
                    size,
                    Action("split", f"[{start}:{start + size}] on dim {self.dim}", (name,)),
                )
                entries.append((_expand(match, template, ctx), part, name))
                start += size
        return build_table(entries, ctx), matched

    def _sizes(self, name: str, ref: TensorRef, ctx: Context) -> list[int]:
        if not -len(ref.shape) <= self.dim < len(ref.shape):
            raise FitError(f"{ctx.where}: {name!r} {list(ref.shape)} has no dim {self.dim}")
        total = ref.shape[self.dim]
        if self.sizes is None:
            if total % len(self.into):
                raise FitError(
                    f"{ctx.where}: {name!r} dim {self.dim} is {total}, not divisible "
                    f"into {len(self.into)} equal parts; give sizes"
                )
            return [total // len(self.into)] * len(self.into)
        if sum(self.sizes) != total:
            raise FitError(
                f"{ctx.where}: sizes {self.sizes} sum to {sum(self.sizes)} but "
                f"{name!r} dim {self.dim} is {total}"
            )
        return list(self.sizes)


@register
class Merge(Op):
    """Concatenate keys that differ only in capture group ``group``, in ``order`` (values of
    that group), into the ``into`` template along ``dim`` (q, k, v -> qkv)."""

    op: Literal["merge"] = "merge"
    pattern: Pattern
    group: int | str = 1
    order: list[str] = Field(min_length=2)
    into: str
    dim: int = 0

    @model_validator(mode="after")
    def _group_exists(self) -> Merge:
        compiled = re.compile(self.pattern)
        if isinstance(self.group, int) and not 1 <= self.group <= compiled.groups:
            raise ValueError(f"group {self.group}: the pattern has {compiled.groups} groups")
        if isinstance(self.group, str) and self.group not in compiled.groupindex:
            raise ValueError(f"group {self.group!r} is not a named group of the pattern")
        check_template(self.pattern, self.into)
        return self

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        import torch

        families: dict[str, dict[str, tuple[str, re.Match[str]]]] = {}
        for name in table:
            match = self.regex.search(name)
            if not match:
                continue
            value = match.group(self.group)
            if value not in self.order:
                raise FitError(
                    f"{ctx.where}: {name!r} matched with group value {value!r}, "
                    f"which is not in order {self.order}"
                )
            start, end = match.span(self.group)
            families.setdefault(name[:start] + "\0" + name[end:], {})[value] = (name, match)

        merged_at: dict[str, tuple[str, TensorRef]] = {}
        for members in families.values():
            absent = [v for v in self.order if v not in members]
            if absent:
                some = next(iter(members.values()))[0]
                raise FitError(f"{ctx.where}: {some!r} has no partner for {absent}")
            names = [members[v][0] for v in self.order]
            new = _expand(members[self.order[0]][1], self.into, ctx)
            from ckptsurgeon.formats.table import combine

            try:
                ref = combine(
                    [table[n] for n in names],
                    lambda ts: torch.cat(ts, self.dim),
                    Action("merged", f"on dim {self.dim}", tuple(names)),
                )
            except RuntimeError as exc:
                raise FitError(f"{ctx.where}: cannot concatenate {names}: {exc}") from None
            merged_at[names[0]] = (new, ref)
        consumed = {members[v][0] for members in families.values() for v in self.order}

        entries = []
        for name, ref in table.items():
            if name in merged_at:
                entries.append((*merged_at[name], name))
            elif name not in consumed:
                entries.append((name, ref, name))
        return build_table(entries, ctx), len(families)
