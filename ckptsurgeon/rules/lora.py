"""Folding a PEFT LoRA adapter into the base weights, as ``peft``'s ``merge_and_unload`` does.

**Names.** PEFT saves each adapter tensor as ``base_model.model.<module>.<part>``, where
``<module>`` is the targeted module's name in the model the adapter was made on and
``<part>`` is ``lora_A.weight``, ``lora_B.weight``, ``lora_B.bias`` (``lora_bias``),
``lora_embedding_A`` / ``lora_embedding_B`` (embeddings) or ``lora_magnitude_vector``
(DoRA); files other tools wrote may keep the adapter name after the part
(``lora_A.default.weight``), which is dropped. Every other tensor replaces a base tensor
whole, as PEFT loads it over the base's before merging: ``modules_to_save`` copies
(``<module>.<param>``, or ``<module>.modules_to_save[.default].<param>``) and base layers
saved along (``<module>.base_layer.<param>``: targeted embeddings, ``bias: all``).

**Landing.** A module's base weight is ``<module>.weight``. When the checkpoint names its
tensors otherwise than the model the adapter was made on (a bare ``LlamaModel``'s
``layers.0...`` for a ``LlamaForCausalLM`` adapter's ``model.layers.0...``, or an extra
``module.``), one rewrite is sought for every name at once: drop the first *k* dotted
components, then prepend a prefix *P*. Names that land unchanged win; otherwise exactly one
rewrite must land them all (several: ambiguous). A tensor that lands nowhere, or a shape
that disagrees, is a FitError (exit 1); an adapter inconsistent with its own config is a
UsageError (exit 2).

**Math**, per module, in float32, the result cast back to the base weight's dtype:
``scaling = lora_alpha / r`` (``/ sqrt(r)`` under ``use_rslora``), ``r`` and ``lora_alpha``
taken from ``rank_pattern`` / ``alpha_pattern`` by PEFT's ``get_pattern_key``, times the
op's ``scale`` (as PEFT's ``scale_layer`` multiplies ``scaling``). Linear:
``W + (B @ A) * scaling``, the delta transposed for GPT-2's ``Conv1D`` (``fan_in_fan_out``;
a non-square weight's shape decides, as PEFT decides from the module's type, a square one
follows the config); conv: PEFT's composition of the two convs; embedding:
``W + (B @ A)^T * scaling``; ``lora_bias``: ``b + bias_B * scaling``; DoRA:
``m / ||W + dW||_rows * (W + dW)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F

from ckptsurgeon.errors import FitError, UsageError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.formats.peft_adapter import Adapter, LoraSettings
from ckptsurgeon.formats.table import Table, TensorRef
from ckptsurgeon.rules.patterns import show_pattern

PEFT_PREFIX = "base_model.model."
_PARTS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}
_PART = re.compile(r"^(?P<module>.+)\.(?P<part>" + "|".join(re.escape(p) for p in _PARTS) + r")$")
# The adapter name PEFT keeps inside a live model's names and drops when saving.
_ADAPTER_NAME = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)"
    r"\.default(?=\.|$)"
)
# Wrappers whose contents stand for the wrapped module's own tensors.
_WRAPPER = re.compile(r"\.(?:modules_to_save|base_layer)\.")

V = TypeVar("V")


@dataclass
class LoraModule:
    """One targeted module: its name in the adapter's model and its parts by role
    (``A``, ``B``, ``bias``, ``magnitude``), each as (adapter key, ref)."""

    name: str
    parts: dict[str, tuple[str, TensorRef]] = field(default_factory=dict)
    embedding: bool = False

    def key(self, role: str) -> str:
        return self.parts[role][0]

    def ref(self, role: str) -> TensorRef:
        return self.parts[role][1]


@dataclass(frozen=True)
class Replacement:
    """An adapter tensor that replaces a base tensor whole (``modules_to_save``)."""

    adapter_key: str
    name: str  # in the adapter's model
    ref: TensorRef


def parse_adapter(tensors: Table) -> tuple[dict[str, LoraModule], list[Replacement]]:
    """The adapter's tensors sorted into LoRA modules and whole replacements."""
    modules: dict[str, LoraModule] = {}
    replacements = []
    for key, ref in tensors.items():
        name = _ADAPTER_NAME.sub(r".\1", key.removeprefix(PEFT_PREFIX))
        match = _PART.match(name)
        if match is None:
            replacements.append(Replacement(key, _WRAPPER.sub(".", name), ref))
            continue
        module = modules.setdefault(match["module"], LoraModule(match["module"]))
        module.parts[_PARTS[match["part"]]] = (key, ref)
        module.embedding |= match["part"].startswith("lora_embedding_")
    return modules, replacements


def pattern_value(patterns: Mapping[str, V], module: str, default: V, where: str) -> V:
    """PEFT's ``get_pattern_key``: the first pattern (in the config's order) matching the end
    of ``module`` at a dot boundary, read as a regular expression."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return patterns[key]
        except re.error as exc:
            raise UsageError(f"{where}: pattern {show_pattern(key)}: {exc}") from None
    return patterns.get(module, default)


@dataclass(frozen=True)
class Rewrite:
    """Adapter names to table names: drop the first ``drop`` dotted components, then
    prepend ``prefix``."""

    drop: int = 0
    prefix: str = ""

    def __call__(self, name: str) -> str | None:
        parts = name.split(".")
        if self.drop >= len(parts):
            return None
        return self.prefix + ".".join(parts[self.drop :])

    def __str__(self) -> str:
        steps = [f"drop {self.drop} leading components"] if self.drop else []
        steps += [f"prefix {self.prefix!r}"] if self.prefix else []
        return " then ".join(steps) or "unchanged"


def find_rewrite(needed: Sequence[tuple[str, str]], keys: Collection[str], where: str) -> Rewrite:
    """The rewrite that lands every ``(name, adapter key)`` of ``needed`` on its own key
    of ``keys``: names unchanged first, else the fewest components dropped, with exactly
    one prefix. FitError naming the first name that lands nowhere, or the rewrites that
    tie."""
    identity = Rewrite()
    names = list(dict.fromkeys(name for name, _ in needed))  # a replaced base can be merged

    def landed(rw: Rewrite) -> int:  # distinct keys hit: two names on one key do not fit
        return len({rw(n) for n in names} & set(keys))

    if landed(identity) == len(names):
        return identity
    parts = names[0].split(".")
    tried = [identity]
    for drop in range(len(parts)):
        tail = ".".join(parts[drop:])
        found = {
            Rewrite(drop, key[: len(key) - len(tail)])
            for key in keys
            if key == tail or key.endswith("." + tail)
        }
        tried += sorted(found, key=lambda c: c.prefix)
        working = [c for c in sorted(found, key=lambda c: c.prefix) if landed(c) == len(names)]
        if len(working) == 1:
            return working[0]
        if working:
            raise FitError(
                f"{where}: the adapter's names land on the checkpoint in several ways "
                f"({'; '.join(map(str, working[:3]))}); rename the checkpoint first"
            )
    best = max(tried, key=landed)  # the first of the best: names unchanged if they tie
    name, key = next((n, k) for n, k in needed if best(n) not in keys)
    also = f" (nor {best(name)!r})" if best != identity and best(name) else ""
    raise FitError(
        f"{where}: adapter tensor {key!r} is for {name!r}, which is not in the checkpoint{also}"
    )


def merge_adapter(table: Table, adapter: Adapter, scale: float, where: str) -> tuple[Table, int]:
    """``table`` with ``adapter`` folded in, lazily; and how many modules and replaced
    tensors it touched."""
    modules, replacements = parse_adapter(adapter.tensors)
    settings = adapter.settings
    where = f"{where}: adapter {adapter.folder}"
    for module in modules.values():
        _check_parts(module, settings, where)
    needed = [(r.name, r.adapter_key) for r in replacements]
    needed += [(m.name + ".weight", m.key("A")) for m in modules.values()]
    if not needed:
        return table, 0
    rewrite = find_rewrite(needed, table.keys(), where)
    out = dict(table)
    for rep in replacements:
        name = rewrite(rep.name)
        assert name is not None  # find_rewrite landed it
        out[name] = _replaced(out[name], rep, name, where)
    for module in modules.values():
        name = rewrite(module.name + ".weight")
        assert name is not None
        out[name] = merged_weight(out[name], module, settings, scale, name, where)
        if "bias" in module.parts:
            bias = rewrite(module.name + ".bias")
            if bias is None or bias not in out:
                raise FitError(
                    f"{where}: {module.key('bias')!r} (lora_bias) needs the base bias "
                    f"{bias!r}, which is not in the checkpoint"
                )
            out[bias] = merged_bias(out[bias], module, settings, scale, bias, where)
    return out, len(modules) + len(replacements)


def _replaced(base: TensorRef, rep: Replacement, name: str, where: str) -> TensorRef:
    if base.shape != rep.ref.shape:
        raise FitError(
            f"{where}: {rep.adapter_key!r} is {list(rep.ref.shape)} but {name!r} is "
            f"{list(base.shape)}"
        )
    ref = rep.ref.with_action(Action("replaced", "by the adapter's copy"))
    # PEFT loads the copy into the base module's tensor, which keeps its dtype.
    return ref if ref.dtype == base.dtype else ref.cast(base.dtype)


def _check_parts(module: LoraModule, settings: LoraSettings, where: str) -> None:
    """The adapter agrees with itself: both factors, and the parts its config implies."""
    have = set(module.parts)
    for role, other in (("A", "B"), ("B", "A")):
        if role in have and other not in have:
            raise UsageError(
                f"{where}: {module.key(role)!r} has no lora_{other} partner (incomplete adapter)"
            )
    if "A" not in have:
        some = next(iter(module.parts.values()))[0]
        raise UsageError(f"{where}: {some!r} belongs to no lora_A/lora_B pair")
    if settings.lora_bias and "bias" not in have:
        raise UsageError(f"{where}: lora_bias is set but {module.name!r} has no lora_B.bias")
    if not settings.lora_bias and "bias" in have:
        raise UsageError(f"{where}: {module.key('bias')!r} is there but lora_bias is false")
    if settings.use_dora and "magnitude" not in have:
        raise UsageError(
            f"{where}: use_dora is set but {module.name!r} has no lora_magnitude_vector"
        )
    if not settings.use_dora and "magnitude" in have:
        raise UsageError(f"{where}: {module.key('magnitude')!r} is there but use_dora is false")


def module_scaling(
    module: LoraModule, settings: LoraSettings, scale: float, where: str
) -> tuple[int, float]:
    """The module's rank and scaling: ``lora_alpha / r`` (``/ sqrt(r)`` under
    ``use_rslora``), both by pattern, times the op's ``scale``."""
    r = pattern_value(settings.rank_pattern, module.name, settings.r, where)
    alpha = pattern_value(settings.alpha_pattern, module.name, settings.lora_alpha, where)
    return r, alpha / (math.sqrt(r) if settings.use_rslora else r) * scale


@dataclass(frozen=True)
class Delta:
    """How one module's update is computed: its kind, scaling, and whether the linear
    delta is transposed (``fan_in_fan_out``)."""

    kind: str  # linear | conv | embedding
    r: int
    scaling: float
    transpose: bool = False


def module_delta(
    base: TensorRef, module: LoraModule, settings: LoraSettings, scale: float, name: str, where: str
) -> Delta:
    """Check the module's factors against its config and the base weight; how to merge."""
    a, b = module.ref("A"), module.ref("B")
    r, scaling = module_scaling(module, settings, scale, where)
    if a.shape[:1] != (r,) or b.shape[1:2] != (r,):
        raise UsageError(
            f"{where}: adapter_config.json gives {module.name!r} r={r}, but "
            f"{module.key('A')!r} is {list(a.shape)} and {module.key('B')!r} is {list(b.shape)}"
        )
    if not base.dtype.is_floating_point:
        raise FitError(
            f"{where}: {name!r} is {base.dtype}; a LoRA merges into floating-point weights"
        )

    def mismatch(expected: Sequence[int]) -> FitError:
        return FitError(
            f"{where}: {module.key('A')!r} and {module.key('B')!r} make a "
            f"{list(expected)} update but {name!r} is {list(base.shape)}"
        )

    if module.embedding:
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise UsageError(f"{where}: {module.name!r}: embedding factors must be 2-D")
        if base.shape != (a.shape[1], b.shape[0]):
            raise mismatch((a.shape[1], b.shape[0]))
        if settings.use_dora:
            raise UsageError(
                f"{where}: {module.name!r}: merging DoRA into embeddings is not supported"
            )
        if settings.lora_bias:
            raise UsageError(f"{where}: {module.name!r}: lora_bias on an embedding (PEFT has none)")
        return Delta("embedding", r, scaling)
    if len(a.shape) > 2:
        kernel = a.shape[2:]
        if len(base.shape) != len(a.shape) or base.shape[2:] != kernel:
            raise mismatch((b.shape[0], a.shape[1], *kernel))
        if base.shape[0] == b.shape[0] and base.shape[1] != a.shape[1]:
            raise UsageError(f"{where}: {module.name!r}: LoRA on a grouped conv is not supported")
        if base.shape != (b.shape[0], a.shape[1], *kernel):
            raise mismatch((b.shape[0], a.shape[1], *kernel))
        if settings.use_dora:
            raise UsageError(f"{where}: {module.name!r}: merging DoRA into convs is not supported")
        return Delta("conv", r, scaling)
    out_f, in_f = b.shape[0], a.shape[1]
    plain, flipped = base.shape == (out_f, in_f), base.shape == (in_f, out_f)
    if not (plain or flipped):
        raise mismatch((out_f, in_f))
    transpose = settings.fan_in_fan_out if plain and flipped else flipped
    if "magnitude" in module.parts and module.ref("magnitude").shape != (out_f,):
        raise UsageError(
            f"{where}: {module.key('magnitude')!r} is {list(module.ref('magnitude').shape)}, "
            f"expected [{out_f}] (one magnitude per output feature)"
        )
    return Delta("linear", r, scaling, transpose)


def lora_update(delta: Delta, a: torch.Tensor, b: torch.Tensor, base_shape: Sequence[int]):
    """The module's ``get_delta_weight`` in PEFT, in float32 (PEFT upcasts half-precision
    adapters when it loads them), already scaled: a new tensor, scaled in place (the same
    rounding as PEFT's ``product * scaling``, without a second weight-sized buffer)."""
    a, b = a.float(), b.float()
    if delta.kind == "embedding":
        return (b @ a).T.mul_(delta.scaling)
    if delta.kind == "conv":
        if tuple(base_shape[2:4]) == (1, 1):
            product = b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)
            return product.unsqueeze(2).unsqueeze(3).mul_(delta.scaling)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
        return conv(a.transpose(0, 1), b).transpose(0, 1).mul_(delta.scaling)
    product = b @ a
    return (product.T if delta.transpose else product).mul_(delta.scaling)


def merged_weight(
    base: TensorRef, module: LoraModule, settings: LoraSettings, scale: float, name: str, where: str
) -> TensorRef:
    """``base`` with the module's update folded in, as a lazy ref reading the base weight
    and the adapter's factors only when it is materialised."""
    delta = module_delta(base, module, settings, scale, name, where)
    magnitude = module.parts.get("magnitude")

    def merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *m: torch.Tensor):
        # Added into the update, which is ours: ``w`` may be the source's own tensor.
        merged = lora_update(delta, a, b, w.shape).add_(w)
        if m:  # DoRA: rows rescaled to the learnt magnitude, as DoraLinearVariant.merge
            rows = merged.T if delta.transpose else merged
            factor = (m[0].float() / torch.linalg.norm(rows, dim=1)).view(-1, 1)
            merged = (factor.T if delta.transpose else factor) * merged
        return merged.to(w.dtype)

    parts = [module.ref("A"), module.ref("B"), *([magnitude[1]] if magnitude else [])]
    detail = f"(r={delta.r}, scaling {delta.scaling:g}{', DoRA' if magnitude else ''})"
    return _lazy(base, parts, merge, Action("merged lora", detail))


def merged_bias(
    base: TensorRef, module: LoraModule, settings: LoraSettings, scale: float, name: str, where: str
) -> TensorRef:
    """The base bias plus ``lora_B``'s bias times the module's scaling (PEFT's merge)."""
    _, scaling = module_scaling(module, settings, scale, where)
    extra = module.ref("bias")
    if extra.shape != base.shape:
        raise FitError(
            f"{where}: {module.key('bias')!r} is {list(extra.shape)} but {name!r} is "
            f"{list(base.shape)}"
        )

    def merge(b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return (b.float() + e.float() * scaling).to(b.dtype)

    return _lazy(base, [extra], merge, Action("merged lora", f"(bias, scaling {scaling:g})"))


def _lazy(
    base: TensorRef, parts: Sequence[TensorRef], fn: Callable[..., torch.Tensor], action: Action
) -> TensorRef:
    """A ref of ``fn(base, *parts)`` with the base's shape, dtype and name history.

    Shapes were checked by :func:`module_delta`; running ``fn`` on the meta device as well,
    as ``TensorRef.derive`` does, would import torch's compiler stack for the matmuls
    (seconds per run) to learn nothing new."""
    parts = tuple(parts)
    return TensorRef(
        shape=base.shape,
        dtype=base.dtype,
        loader=lambda: fn(base.load(), *(p.load() for p in parts)).contiguous(),
        sources=base.sources,
        actions=(*base.actions, action),
    )
