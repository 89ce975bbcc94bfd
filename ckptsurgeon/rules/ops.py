"""The rule ops: one class per op, holding its fields (the schema) and its behaviour.

Ops transform the lazy table (name -> TensorRef) without reading tensor data: renames move
refs, tensor ops derive new refs whose shapes are worked out on the meta device. Adding an
op means writing one class here and decorating it with ``@register``.

torch is imported inside the few methods that build tensors, so that ``validate`` and
``schema``, which only need the fields, never pay for importing it.
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, PositiveInt, model_validator

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import DType, InitName, Pattern, Strict
from ckptsurgeon.targets.seeds import derive_seed

if TYPE_CHECKING:
    import torch

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
        return f"pattern {pattern!r}" if pattern else "the op"

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
            raise FitError(f"{ctx.where}: replacement {self.replace!r}: {exc}") from None


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
        ctx.dropped.update(dict.fromkeys(gone, f"{ctx.where}: matches {self.pattern!r}"))
        return {n: r for n, r in table.items() if n not in set(gone)}, len(gone)


@register
class Keep(Op):
    """Remove every key that does not match ``pattern``."""

    op: Literal["keep"] = "keep"
    pattern: Pattern

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        kept = {n: r for n, r in table.items() if self.regex.search(n)}
        ctx.dropped.update(
            {n: f"{ctx.where}: does not match {self.pattern!r}" for n in table if n not in kept}
        )
        return kept, len(kept)


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


@register
class Cast(TensorOp):
    """Change dtype. Without ``pattern`` only floating-point tensors are cast (integer
    buffers such as BatchNorm's ``num_batches_tracked`` keep their type)."""

    op: Literal["cast"] = "cast"
    dtype: DType
    pattern: Pattern | None = None  # type: ignore[assignment]

    def selects(self, name: str, ref: TensorRef) -> bool:
        if self.pattern is None:
            return ref.dtype.is_floating_point
        return bool(self.regex.search(name))

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        from ckptsurgeon.formats.table import parse_dtype

        return ref.cast(parse_dtype(self.dtype))


@register
class Transpose(TensorOp):
    """Swap two dimensions (e.g. Conv1D <-> Linear weights)."""

    op: Literal["transpose"] = "transpose"
    dims: tuple[int, int] = (0, 1)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        a, b = self.dims
        return ref.derive(lambda t: t.transpose(a, b), Action("transposed", f"{a},{b}"))


@register
class Reshape(TensorOp):
    """View with a new shape of the same number of elements (one -1 allowed)."""

    op: Literal["reshape"] = "reshape"
    shape: list[int] = Field(min_length=0)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        shape = tuple(self.shape)
        return ref.derive(
            lambda t: t.reshape(shape), Action("reshaped", f"to {list(shape)}"), keeps_bytes=True
        )


def check_template(pattern: str, template: str) -> None:
    """ValueError if ``template`` refers to a group ``pattern`` does not have (caught when
    the rules file is validated, not when a key first matches)."""
    try:
        re.compile(pattern).sub(template, "")  # parses the template even with no match
    except (re.error, IndexError) as exc:
        raise ValueError(f"template {template!r}: {exc}") from None


def _expand(match: re.Match[str], template: str, ctx: Context) -> str:
    try:
        return match.expand(template)
    except (re.error, IndexError) as exc:
        raise FitError(f"{ctx.where}: template {template!r}: {exc}") from None


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


@register
class Resize(TensorOp):
    """Pad or truncate along ``dim`` to ``size`` (vocabulary, classes). New slices are
    ``zeros``, ``normal`` (mean 0, ``std``) or the ``mean`` of the existing slices."""

    op: Literal["resize"] = "resize"
    dim: int = 0
    size: int = Field(gt=0)
    init: Literal["zeros", "normal", "mean"] = "mean"
    std: float = Field(0.02, gt=0)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        import torch

        dim, size = self.dim, self.size
        if not -len(ref.shape) <= dim < len(ref.shape):
            raise FitError(f"{ctx.where}: {name!r} {list(ref.shape)} has no dim {dim}")
        old = ref.shape[dim]
        if size == old:
            return ref
        action = Action("resized", f"dim {dim} {old}->{size} ({self.init})")
        if size < old:
            return ref.narrow(dim, 0, size, action)
        if old == 0 and self.init == "mean":
            raise FitError(
                f"{ctx.where}: {name!r} dim {dim} is empty, so it has no mean; "
                "use init: zeros or normal"
            )
        seed = derive_seed(ctx.seed, name)

        def resize(t: torch.Tensor) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = size - old
            if t.device.type == "meta" or self.init == "zeros":
                extra = torch.zeros(shape, dtype=t.dtype, device=t.device)
            elif self.init == "mean":
                extra = t.float().mean(dim, keepdim=True).expand(shape).to(t.dtype)
            else:
                gen = torch.Generator().manual_seed(seed)
                extra = (torch.randn(shape, generator=gen) * self.std).to(t.dtype)
            return torch.cat([t, extra], dim)

        return ref.derive(resize, action)


@register
class AdaptInputChannels(TensorOp):
    """A first conv from 3 to ``channels`` input channels, as timm does: 1 sums over the
    input channels; N repeats them ceil(N/3) times, keeps N, and rescales by 3/N."""

    op: Literal["adapt_input_channels"] = "adapt_input_channels"
    channels: int = Field(gt=0)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        n = self.channels
        if len(ref.shape) < 3:
            raise FitError(f"{ctx.where}: {name!r} {list(ref.shape)} is not a conv weight")
        old = ref.shape[1]
        if n != 1 and old != 3:
            raise FitError(
                f"{ctx.where}: {name!r} has {old} input channels; only 3 -> N is "
                "defined (and anything -> 1)"
            )

        def adapt(t: torch.Tensor) -> torch.Tensor:
            w = t.float()
            if n == 1:
                w = w.sum(dim=1, keepdim=True)
            else:
                w = w.repeat(1, math.ceil(n / 3), *([1] * (w.dim() - 2)))[:, :n] * (3 / n)
            return w.to(t.dtype)

        return ref.derive(adapt, Action("input", f"channels {old}->{n}"))


@register
class PermuteRope(TensorOp):
    """Reorder the rows of rotary q/k projections (weights and biases) between the
    interleaved layout (Meta's original Llama, GGUF: each head's rotary pairs sit in adjacent
    rows) and the half-split layout transformers' ``rotate_half`` expects (a head's first
    halves, then its second halves), as ``transformers``' ``PermuteForRope`` does.

    The rows are viewed as (heads, half_head, 2) and transposed to (heads, 2, half_head);
    ``inverse`` goes back. A wrong ``heads`` still yields a valid-looking tensor, so the
    shape is checked at planning time, but only the user can give the right head count
    (the KV head count for a grouped-query ``k_proj``).
    """

    op: Literal["permute_rope"] = "permute_rope"
    heads: PositiveInt
    inverse: bool = False

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        if len(ref.shape) not in (1, 2):
            raise FitError(
                f"{ctx.where}: {name!r} {list(ref.shape)} is neither a 2-D weight nor a 1-D bias"
            )
        heads, rows = self.heads, ref.shape[0]
        if rows % (2 * heads):
            raise FitError(
                f"{ctx.where}: {name!r} {list(ref.shape)} has {rows} rows, not divisible "
                f"by 2 * heads = {2 * heads}"
            )
        half = rows // heads // 2
        pairs = (2, half) if self.inverse else (half, 2)

        def permute(t: torch.Tensor) -> torch.Tensor:
            rest = t.shape[1:]
            return t.reshape(heads, *pairs, *rest).transpose(1, 2).reshape(rows, *rest)

        way = "back to interleaved" if self.inverse else "to half-split"
        return ref.derive(permute, Action("permuted", f"rope rows {way} ({heads} heads)"))


class _FromTarget(Op):
    """Ops that take fresh values from the target (its own initialisation, or ``init``)."""

    nothing_found: ClassVar[str] = ""
    needs_target: ClassVar[bool] = True

    pattern: Pattern | None = None
    init: InitName | None = Field(
        None, description="for checkpoint/manifest targets (no model to initialise from)"
    )

    def _fresh(self, names: list[str], ctx: Context) -> dict[str, TensorRef]:
        if ctx.target is None:
            raise FitError(f"{ctx.where}: needs a target (target.model, checkpoint or manifest)")
        return ctx.target.initial(names, ctx.seed, self.init, ctx.where)

    def _selected(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.pattern is None or self.regex.search(n)]

    def describe_selector(self) -> str:
        where = f" among keys matching {self.pattern!r}" if self.pattern else ""
        return f"{self.nothing_found}{where}:"


@register
class ReinitMismatched(_FromTarget):
    """Keys whose shape differs from the target's take the target's fresh values."""

    op: Literal["reinit_mismatched"] = "reinit_mismatched"
    nothing_found: ClassVar[str] = "no shape mismatch with the target"

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        from ckptsurgeon.targets.check import loads_as_shape

        expected = ctx.target.expected if ctx.target else {}
        names = self._selected(
            n
            for n, ref in table.items()
            if n in expected and not loads_as_shape(ref.shape, expected[n][0])
        )
        fresh = self._fresh(names, ctx) if names else {}
        out = {
            n: fresh[n].with_action(Action("reinit", f"(checkpoint had {list(ref.shape)})"))
            if n in fresh
            else ref
            for n, ref in table.items()
        }
        return out, len(names)


@register
class FillMissing(_FromTarget):
    """Keys the target has and the checkpoint lacks take the target's fresh values."""

    op: Literal["fill_missing"] = "fill_missing"
    nothing_found: ClassVar[str] = "no key missing from the checkpoint"

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        expected = ctx.target.expected if ctx.target else {}
        names = self._selected(n for n in expected if n not in table)
        copies = self._tied_partners(names, table, ctx.target.tied if ctx.target else {})
        own = [n for n in names if n not in copies]
        fresh = self._fresh(own, ctx) if own else {}
        out = dict(table)
        out.update({n: fresh[n].with_action(Action("filled")) for n in own})
        for name, partner in copies.items():
            out[name] = out[partner].with_action(
                Action("filled", "(tied in the target)", (partner,))
            )
        return out, len(names)

    @staticmethod
    def _tied_partners(
        names: list[str], table: Table, tied: dict[str, tuple[str, ...]]
    ) -> dict[str, str]:
        """The name each missing ``names`` entry copies: one the model ties it to (GPT-2's
        ``lm_head.weight`` is ``transformer.wte.weight``). ``load_state_dict`` writes both
        into one parameter, the later one last, so fresh values there would overwrite the
        trained ones. A tied name the table has comes first; else the group's first missing
        name is made fresh and the others copy it."""
        copies: dict[str, str] = {}
        leaders: dict[tuple[str, ...], str] = {}
        for name in names:
            group = tied.get(name)
            if group is None:
                continue
            present = next((p for p in group if p in table), None)
            if present is not None:
                copies[name] = present
            elif group in leaders:
                copies[name] = leaders[group]
            else:
                leaders[group] = name
        return copies


def _op_union() -> Any:
    return Annotated[Union[tuple(OPS.values())], Field(discriminator="op")]  # noqa: UP007


AnyOp = _op_union()
