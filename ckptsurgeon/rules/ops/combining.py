"""Ops that bring values from outside the table: the rules file's named sources (take,
average), a PEFT LoRA adapter (merge_lora) and the target's fresh values
(reinit_mismatched, fill_missing)."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from ckptsurgeon.errors import FitError, UsageError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import InitName, Pattern
from ckptsurgeon.rules.ops.base import Context, Op, check_template, register
from ckptsurgeon.rules.ops.kernels import _weighted_mean
from ckptsurgeon.rules.patterns import show_pattern

if TYPE_CHECKING:
    from ckptsurgeon.formats.table import Table, TensorRef


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
        return f"pattern {show_pattern(self.pattern)} in source {self.from_!r}"

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
            lineage=None,  # its steps start in another source's table
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
        where = f" among keys matching {show_pattern(self.pattern)}" if self.pattern else ""
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
