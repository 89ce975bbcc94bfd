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

from ckptsurgeon.errors import FitError, UsageError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import DType, FloatDType, InitName, Pattern, Strict
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


@register
class MergeLora(Op):
    """Fold a PEFT LoRA adapter (a folder: ``adapter_config.json`` and its weights) into the
    base weights it targets, as PEFT's ``merge_and_unload`` does; the naming, landing and
    math rules are :mod:`ckptsurgeon.rules.lora`'s. Merged weights stay lazy: the base
    weight and the adapter's factors are read when the result is written."""

    op: Literal["merge_lora"] = "merge_lora"
    adapter: str = Field(min_length=1, description="the PEFT adapter folder")
    scale: float = Field(1.0, description="multiplies each module's LoRA scaling")

    def describe_selector(self) -> str:
        return f"adapter {self.adapter!r}"

    def input_files(self, base_dir: str) -> list[str]:
        from ckptsurgeon.formats.hub import local_path
        from ckptsurgeon.paths import resolve

        return [local_path(resolve(self.adapter, base_dir))]

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        from ckptsurgeon.formats.peft_adapter import open_adapter
        from ckptsurgeon.paths import resolve
        from ckptsurgeon.rules.lora import merge_adapter

        adapter = open_adapter(resolve(self.adapter, ctx.base_dir or None))
        return merge_adapter(table, adapter, self.scale, ctx.where)


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


# -- Several checkpoints: named sources (take, average); blockwise fp8 (dequantize) -------


class FromSources(Op):
    """Ops that read the rules file's named ``sources:`` (validation checks each name is
    declared; ``Context.sources`` opens a source the first time it is asked for)."""

    @abstractmethod
    def source_names(self) -> list[str]:
        """The names in ``sources:`` this op reads, in order."""

    def _source(self, name: str, ctx: Context) -> Table:
        if name not in ctx.sources:
            raise UsageError(f"{ctx.where}: no source named {name!r} (declare it under sources:)")
        return ctx.sources[name]


@register
class Take(FromSources):
    """Bring the keys of source ``from`` that match ``pattern`` into the table, named
    ``re.sub(pattern, replace, key)`` when ``replace`` is given. A name the table already
    has is a collision (exit 1, naming both) unless ``overwrite: true``, which replaces the
    table's tensor in place; new names are appended. Each taken key's plan entry reads
    ``taken from <source>`` and lists ``<source>:<key>`` as its origin.

    Stable Diffusion's EMA copy (``model_ema.<name without dots>``, in the same state dict
    as the model) is read by declaring the file as a source with ``dotless: model_ema``:
    that source then holds the EMA weights under the model's own names, so
    ``{op: take, from: ema, pattern: '^model\\.diffusion_model\\.', overwrite: true}``
    swaps them in (see :mod:`ckptsurgeon.formats.sd_ema`).
    """

    op: Literal["take"] = "take"
    from_: str = Field(alias="from", min_length=1, description="a name in sources")
    pattern: Pattern
    replace: str | None = Field(None, description="rename template, as in rename")
    overwrite: bool = Field(False, description="replace keys the table already has")

    @model_validator(mode="after")
    def _template_fits(self) -> Take:
        if self.replace is not None:
            check_template(self.pattern, self.replace)
        return self

    def source_names(self) -> list[str]:
        return [self.from_]

    def describe_selector(self) -> str:
        return f"pattern {self.pattern!r} in source {self.from_!r}"

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        taken: dict[str, TensorRef] = {}
        origin: dict[str, str] = {}
        for key, ref in self._source(self.from_, ctx).items():
            if not self.regex.search(key):
                continue
            new = key if self.replace is None else self.regex.sub(self.replace, key)
            if new in taken:
                raise FitError(
                    f"{ctx.where}: {origin[new]!r} and {key!r} of source {self.from_!r} "
                    f"both become {new!r}"
                )
            if new in table and not self.overwrite:
                raise FitError(
                    f"{ctx.where}: {key!r} of source {self.from_!r} becomes {new!r}, which "
                    "the table already has (add overwrite: true to replace it)"
                )
            taken[new] = self._taken(ref, key, replacing=new in table)
            origin[new] = key
        out = {name: taken.get(name, ref) for name, ref in table.items()}
        out.update({name: ref for name, ref in taken.items() if name not in table})
        return out, len(taken)

    def _taken(self, ref: TensorRef, key: str, replacing: bool) -> TensorRef:
        from dataclasses import replace

        detail = f"from {self.from_}" + (", replacing the table's" if replacing else "")
        return replace(
            ref,
            sources=tuple(f"{self.from_}:{s}" for s in ref.sources or (key,)),
            actions=(*ref.actions, Action("taken", detail)),
        )


@register
class Average(FromSources):
    """Each tensor (matching ``pattern``, else every one) becomes the weighted mean of
    itself and the same-named tensors of the sources in ``from``: the table's tensor counts
    first, so ``weights`` has 1 + len(from) entries (default: all equal), none negative and
    not all zero; the mean is sum(w_i * x_i) / sum(w_i).

    As timm's ``avg_checkpoints`` does, values are summed in float64 (one tensor at a time,
    when the result is written), divided, and cast back, here to the table's dtype. Integer
    and bool tensors (``num_batches_tracked``) keep the table's own value, where timm
    would average them into floats. A key or shape a source lacks is exit 1.
    """

    op: Literal["average"] = "average"
    from_: list[str] = Field(alias="from", min_length=1, description="names in sources")
    weights: list[float] | None = Field(
        None, description="one per input, the table first: 1 + len(from) entries"
    )
    pattern: Pattern | None = None

    @model_validator(mode="after")
    def _weights_fit(self) -> Average:
        if len(set(self.from_)) != len(self.from_):
            raise ValueError(f"from names a source twice: {self.from_}")
        if self.weights is None:
            return self
        if len(self.weights) != 1 + len(self.from_):
            raise ValueError(
                f"weights has {len(self.weights)} entries; it needs 1 + {len(self.from_)} "
                f"= {1 + len(self.from_)} (the table itself first, then each source in from)"
            )
        if any(not math.isfinite(w) or w < 0 for w in self.weights):
            raise ValueError(f"weights must be finite and not negative: {self.weights}")
        if not any(self.weights):
            raise ValueError("weights are all zero: there is nothing to average")
        return self

    def source_names(self) -> list[str]:
        return list(self.from_)

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        sources = [(name, self._source(name, ctx)) for name in self.from_]
        weights = self.weights or [1.0] * (1 + len(self.from_))
        shown = ", ".join(f"{w:g}" for w in weights) if self.weights else "equal"
        action = Action("averaged", f"with {', '.join(self.from_)} (weights {shown})")
        out: Table = {}
        matched = 0
        for name, ref in table.items():
            if self.pattern is not None and not self.regex.search(name):
                out[name] = ref
                continue
            matched += 1
            parts = [_same_tensor(name, ref, src, source, ctx) for source, src in sources]
            if ref.dtype.is_floating_point:
                out[name] = _weighted_mean(ref, parts, weights, action)
            else:
                out[name] = ref.with_action(Action("kept", "(not a float: not averaged)"))
        return out, matched


def _same_tensor(name: str, ref: TensorRef, table: Table, source: str, ctx: Context) -> TensorRef:
    """``table[name]``, which must have ``ref``'s shape; FitError naming both otherwise."""
    other = table.get(name)
    if other is None:
        raise FitError(f"{ctx.where}: {name!r} is in the table but not in source {source!r}")
    if other.shape != ref.shape:
        raise FitError(
            f"{ctx.where}: {name!r} is {list(ref.shape)} in the table but "
            f"{list(other.shape)} in source {source!r}"
        )
    return other


AVERAGE_CHUNK = 1 << 20  # elements averaged at a time when every input lies whole in a file


def _weighted_mean(
    first: TensorRef, others: list[TensorRef], weights: list[float], action: Action
) -> TensorRef:
    """A lazy ``sum(w_i * x_i) / sum(w)`` in float64, cast to ``first``'s dtype. Memory
    does not grow with the number of inputs: when every input's bytes lie whole in a file
    (safetensors) the sum runs over ``AVERAGE_CHUNK`` elements at a time, reading each
    input's piece; otherwise only the accumulator and one input are held. Unit weights add
    without multiplying, so equal weights give exactly timm's ``avg_checkpoints`` (sum,
    then divide by the count); both ways round each element alike."""
    from dataclasses import replace
    from functools import partial

    import torch

    refs = [first, *others]
    total = math.fsum(weights)

    def mean_of(parts: Callable[[TensorRef], torch.Tensor]) -> torch.Tensor:
        acc = parts(first).to(torch.float64, copy=True)
        if weights[0] != 1.0:
            acc.mul_(weights[0])
        for ref, weight in zip(others, weights[1:], strict=True):
            acc.add_(parts(ref), alpha=weight)
        return acc.div_(total)

    def mean() -> torch.Tensor:
        if not all(r.span is not None and r.span.length == r.nbytes for r in refs):
            return mean_of(lambda r: r.load()).to(first.dtype)
        out = torch.empty(first.shape, dtype=first.dtype)
        flat = out.view(-1)
        for start in range(0, first.numel, AVERAGE_CHUNK):
            count = min(AVERAGE_CHUNK, first.numel - start)
            flat[start : start + count] = mean_of(partial(_elements, start=start, count=count))
        return out

    return replace(first, loader=mean, span=None, cast_from=None, actions=(*first.actions, action))


def _elements(ref: TensorRef, start: int, count: int) -> torch.Tensor:
    """Elements ``start`` to ``start + count`` of ``ref`` (flat), read from its file span."""
    import torch

    from ckptsurgeon.formats.spans import read_span

    assert ref.span is not None
    size = ref.dtype.itemsize
    return torch.frombuffer(read_span(ref.span.sub(start * size, count * size)), dtype=ref.dtype)


FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


@register
class Dequantize(Op):
    """Blockwise-scaled float8 weights (DeepSeek-V3's layout, also compressed-tensors'
    fp8 ``block`` strategy) to ``dtype``, as DeepSeek's ``weight_dequant`` does.

    Every float8 tensor matching ``pattern`` is dequantized (others are left alone, so
    ``'\\.weight$'`` skips bf16 norms); its scale is the tensor named
    ``re.sub(pattern, scale, key)``, e.g. ``'\\g<0>_scale_inv'`` -> ``…weight_scale_inv``.
    With ``block`` [b0, b1] the scale has shape (ceil(rows / b0), ceil(cols / b1)) and
    element (i, j) multiplies block (i, j) of the weight; edge blocks may be partial. A
    scale with one element scales the whole tensor (per-tensor fp8). The product is taken
    in float32, then cast to ``dtype``; it is computed one block-row at a time, when the
    result is written. Scales used are dropped; a float8 weight without one is exit 1.
    """

    op: Literal["dequantize"] = "dequantize"
    pattern: Pattern
    scale: str = Field(min_length=1, description=r"scale name template, e.g. '\g<0>_scale_inv'")
    block: list[PositiveInt] = Field(default_factory=lambda: [128, 128], min_length=1)
    dtype: FloatDType = "bfloat16"

    @model_validator(mode="after")
    def _template_fits(self) -> Dequantize:
        check_template(self.pattern, self.scale)
        return self

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        from ckptsurgeon.formats.table import dtype_name, parse_dtype

        scale_of: dict[str, str] = {}
        for name, ref in table.items():
            if dtype_name(ref.dtype) in FP8_DTYPES and self.regex.search(name):
                scale = self.regex.sub(self.scale, name, count=1)
                if scale not in table or scale == name:
                    raise FitError(f"{ctx.where}: float8 {name!r} has no scale tensor {scale!r}")
                scale_of[name] = scale
        scales = {s: w for w, s in scale_of.items()}
        dtype = parse_dtype(self.dtype)
        out: Table = {}
        for name, ref in table.items():
            if name in scale_of:
                out[name] = self._dequantized(name, ref, table[scale_of[name]], dtype, ctx)
            elif name not in scales:
                out[name] = ref
        ctx.dropped.update(
            {s: f"{ctx.where}: the scale of {w!r}, folded into it" for s, w in scales.items()}
        )
        return out, len(scale_of)

    def _dequantized(
        self, name: str, ref: TensorRef, scale: TensorRef, dtype: torch.dtype, ctx: Context
    ) -> TensorRef:
        from ckptsurgeon.formats.table import TensorRef, dtype_name

        shape = ref.shape
        block = list(shape) if scale.numel == 1 else list(self.block)
        if len(block) != len(shape):
            raise FitError(
                f"{ctx.where}: {name!r} {list(shape)} has {len(shape)} dims but block "
                f"{self.block} has {len(self.block)}"
            )
        blocks = tuple(-(-size // max(b, 1)) for size, b in zip(shape, block, strict=True))
        if scale.numel != 1 and scale.shape != blocks:
            raise FitError(
                f"{ctx.where}: scale of {name!r} {list(shape)} is {list(scale.shape)}; "
                f"blocks of {self.block} need {list(blocks)}"
            )

        def load() -> torch.Tensor:
            return _dequantize_blocks(ref.load(), scale.load().reshape(blocks), block, dtype)

        return TensorRef(
            shape=shape,
            dtype=dtype,
            loader=load,
            sources=(*ref.sources, *scale.sources),
            actions=(
                *ref.actions,
                Action(
                    "dequantized",
                    f"{dtype_name(ref.dtype)} to {dtype_name(dtype)} "
                    f"(blocks {'x'.join(map(str, block))})",
                ),
            ),
        )


def _dequantize_blocks(
    weight: torch.Tensor, scale: torch.Tensor, block: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """``weight * scale`` with each scale element spread over its block, in float32 and
    cast to ``dtype``; one block-row at a time, so the float32 product never exists whole."""
    import torch

    if weight.dim() == 0:
        return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)
    out = torch.empty(weight.shape, dtype=dtype)
    rows = max(block[0], 1)
    for i in range(scale.shape[0]):
        part = weight[i * rows : (i + 1) * rows].to(torch.float32)
        factor = scale[i : i + 1].to(torch.float32)
        for dim in range(1, weight.dim()):
            factor = factor.repeat_interleave(block[dim], dim).narrow(dim, 0, weight.shape[dim])
        out[i * rows : (i + 1) * rows] = part.mul_(factor)
    return out


def _op_union() -> Any:
    return Annotated[Union[tuple(OPS.values())], Field(discriminator="op")]  # noqa: UP007


AnyOp = _op_union()
