"""Verification: does the result compute what the source computed?

The *reference* model is loaded with the source checkpoint, the *candidate* (the target
model) with the result; both run on the same seeded inputs in eval mode under
``torch.no_grad()``, and their outputs (or named module outputs) are compared.

When they diverge, the first module responsible is found by walking the module tree of
the candidate: modules are matched across the two models through the plan (a module whose
parameters all came from one reference module is that module, whatever it is called now),
and at each level the first matched child whose output diverges while its input agrees is
descended into. Modules whose weights were re-initialised are expected to differ. A layer
whose rows the plan moved (``permute_rope``, ``split``, ``merge``) is compared with the
reference outputs carried through the same moves: the plan is replayed on element indices
(:func:`~ckptsurgeon.formats.table.replay`), which says which reference output feature
each of its output features is; a layer for which that cannot be derived is reported as
not compared, by name, and its ancestors are still compared.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckptsurgeon.engine.rewrite import run_rules
from ckptsurgeon.errors import CkptSurgeonWarning, UsageError, VerifyError
from ckptsurgeon.formats.reader import open_checkpoint
from ckptsurgeon.formats.table import Table, TensorRef, parse_dtype, replay
from ckptsurgeon.paths import resolve
from ckptsurgeon.rules.config import SourceSpec
from ckptsurgeon.rules.document import RulesFile
from ckptsurgeon.rules.verify import ModulePair, VerifySpec
from ckptsurgeon.targets.check import check_table
from ckptsurgeon.targets.config import TargetSpec
from ckptsurgeon.targets.models import build_model
from ckptsurgeon.targets.outputs import output_tensor
from ckptsurgeon.targets.spec import TargetInfo, expected_from_model, tied_names

# (atol, rtol) by the least precise floating dtype of the result: bf16 keeps 8 bits of
# mantissa, fp16 11, fp32 24; the bounds leave room for the rounding of a whole forward pass.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-8, 1e-7),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float8_e4m3fn: (1e-1, 1e-1),
    torch.float8_e5m2: (2e-1, 2e-1),
}
# Logits may differ within tolerance, yet the predicted token should not change.
TOP1_AGREEMENT = 0.99
# Verbs after which a key holds values made on purpose, not converted (see rules/ops.py).
FRESH_VERBS = frozenset({"reinit", "filled", "resized"})
# Verbs after which a module's output is reordered or cut apart on purpose.
RELAYOUT_VERBS = frozenset({"permuted", "split", "merged"})
# Verbs that move elements without computing new values: a history made only of these
# can be replayed on element indices to find where each element came from.
RENAMING_VERBS = frozenset({"renamed", "stripped", "prefixed", "mapped", "copied", "cast"})
MOVING_VERBS = RELAYOUT_VERBS | RENAMING_VERBS | {"transposed", "reshaped"}
# Where a layer keeps its output features: (dim of its weight, dim of its output), found by
# class (through the class's bases). Modules not listed whose weight is 1-D (norms) scale
# the last dim of their output feature by feature.
FEATURE_DIMS: dict[str, tuple[int, int]] = {
    "Linear": (0, -1),
    "Conv1D": (1, -1),  # transformers' GPT-2 layer: weight [in, out]
    "_ConvTransposeNd": (1, 1),  # weight [in, out, ...]
    "_ConvNd": (0, 1),
    "Embedding": (1, -1),
    "LayerNorm": (0, -1),
    "_NormBase": (0, 1),  # BatchNorm, InstanceNorm
    "GroupNorm": (0, 1),
}


@dataclass(frozen=True)
class Comparison:
    """One compared pair of outputs."""

    reference: str
    candidate: str
    max_abs_err: float
    max_rel_err: float
    ok: bool
    top1_agreement: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reference": self.reference,
            "candidate": self.candidate,
            "ok": self.ok,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
        }
        if self.top1_agreement is not None:
            out["top1_agreement"] = self.top1_agreement
        if self.note:
            out["note"] = self.note
        return out

    def line(self) -> str:
        cand, ref = self.candidate or "(the whole model)", self.reference or "(the whole model)"
        name = cand if cand == ref else f"{cand} (reference: {ref})"
        text = f"{name}: max abs err {self.max_abs_err:.2e}, max rel err {self.max_rel_err:.2e}"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        return text + (f" ({self.note})" if self.note else "")


@dataclass
class VerifyResult:
    """The verdict, every comparison, and where the two models first diverge."""

    ok: bool
    compared: list[Comparison]
    atol: float
    rtol: float
    first_divergence: Comparison | None = None
    expected_to_differ: list[str] = field(default_factory=list)
    # Modules the search for the first divergence could not compare: name -> why.
    not_compared: dict[str, str] = field(default_factory=dict)
    # Why the inputs may not show what the rules changed.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "ok": self.ok,
            "atol": self.atol,
            "rtol": self.rtol,
            "compared": [c.to_dict() for c in self.compared],
            "first_divergence": first.to_dict() if first else None,
            "expected_to_differ": self.expected_to_differ,
            "not_compared": self.not_compared,
            "warnings": self.warnings,
        }

    def lines(self) -> list[str]:
        out = [("ok   " if c.ok else "FAIL ") + c.line() for c in self.compared]
        if self.first_divergence is not None:
            out.append("first module to diverge: " + self.first_divergence.line())
        # The warnings are not repeated here: they went to stderr as the run began.
        out += [f"not compared: {name} ({why})" for name, why in self.not_compared.items()]
        return out


# -- the models ----------------------------------------------------------------------------


def _load(model: nn.Module, table: Table, what: str) -> None:
    """Load ``table`` strictly into ``model``; UsageError naming ``what`` when it does not fit
    (a verify section whose reference the source does not load into is a bad section)."""
    target = TargetInfo(f"model {type(model).__name__}", expected_from_model(model), model)
    result = check_table(table, target)
    if not result.ok:
        raise UsageError(
            f"{what} does not load strictly into {type(model).__name__}:\n  "
            + "\n  ".join(result.lines()[:8])
        )
    # One tensor at a time into the model's own storage: no third copy of the weights.
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, ref in table.items():
            if isinstance(state.get(name), torch.Tensor):
                state[name].copy_(ref.load())


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"verify.device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"verify.device {name}: no CUDA device here")
    return device


def make_inputs(
    spec: VerifySpec, seed: int, base_dir: str, device: torch.device
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Positional and keyword inputs: seeded random tensors, or a recorded tensors file."""
    if spec.file is not None:
        tensors = open_checkpoint(resolve(spec.file, base_dir)).tensors
        return [], {name: ref.load().to(device) for name, ref in tensors.items()}
    gen = torch.Generator().manual_seed(seed)
    args: list[torch.Tensor] = []
    kwargs: dict[str, torch.Tensor] = {}
    for item in spec.inputs:
        dtype = parse_dtype(item.dtype)
        if dtype.is_floating_point:
            value = torch.randn(item.shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            value = torch.randint(0, 2, item.shape, generator=gen).bool()
        else:
            assert item.high is not None  # the schema requires it for integers
            value = torch.randint(item.low, item.high, item.shape, generator=gen, dtype=dtype)
        if item.name is None:
            args.append(value.to(device))
        else:
            kwargs[item.name] = value.to(device)
    return args, kwargs


class VerifyInputsWarning(CkptSurgeonWarning):
    """verify's inputs cannot show something the rules changed."""


# Keys holding positions: what an input of length 1 never exercises.
POSITIONAL = re.compile(r"pos(ition)?_?(emb|ids)|rotary|rope|wpe", re.IGNORECASE)


def input_warnings(
    inputs: dict[str, torch.Tensor],
    plan: Table,
    candidate: nn.Module,
    highs: dict[str, int] | None = None,
) -> list[str]:
    """Why ``inputs`` may not show what the plan changed: token sequences of length 1 (no
    attention pattern, no second position), a batch of identical samples, token ids whose
    bound (``highs``, by input name; else the largest id drawn) reaches few rows of the
    model's largest embedding."""
    found = []
    permuted = any("permuted" in _verbs(ref) for ref in plan.values())
    positional = next((k for k in plan if POSITIONAL.search(k)), None)
    vocab = max(
        (
            (m.num_embeddings, n)
            for n, m in candidate.named_modules()
            if isinstance(m, nn.Embedding)
        ),
        default=None,
    )
    for name, x in inputs.items():
        tokens = not x.is_floating_point() and x.dtype != torch.bool and x.dim() == 2
        if tokens and x.shape[1] == 1:
            what = "permute_rope's rows" if permuted else None
            what = what or (f"position tensors ({positional})" if positional else None)
            found.append(
                f"{name}: a sequence of length 1 attends only to itself (attention weights "
                "are all 1, rotary embedding is the identity at position 0): query and key "
                "weights and positions never change the output"
                + (f", so {what} cannot show" if what else "")
                + "; use 8 tokens or more"
            )
        if x.dim() >= 1 and x.shape[0] > 1 and all(torch.equal(x[0], y) for y in x[1:]):
            found.append(
                f"{name}: the {x.shape[0]} samples of the batch are all the same; anything "
                "that mixes samples (batch statistics, a transposed batch dim) cannot show"
            )
        if tokens and vocab and name in ("input_ids", "inputs[0]"):
            reached, (rows, embedding) = (highs or {}).get(name, int(x.max()) + 1), vocab
            if reached * 2 < rows:
                found.append(
                    f"{name}: ids below {reached} reach {reached} of the {rows} rows of "
                    f"{embedding}, so changes to the others cannot show; set high: {rows}"
                )
    return found


def _highs(spec: VerifySpec) -> dict[str, int]:
    """The ``high`` of each seeded integer input, by the name :func:`input_warnings` uses."""
    highs: dict[str, int] = {}
    position = 0
    for item in spec.inputs:
        name = item.name
        if name is None:
            name, position = f"inputs[{position}]", position + 1
        if item.high is not None:
            highs[name] = item.high
    return highs


# -- recording module outputs -----------------------------------------------------------


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a module's input or output, in order (ModelOutputs, tuples, dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):  # a transformers ModelOutput
        value = value.to_tuple()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class _Call:
    order: int
    input: torch.Tensor | None
    output: list[torch.Tensor]


@contextmanager
def _recording(model: nn.Module, names: set[str]) -> Iterator[dict[str, _Call]]:
    """Record the first call of each named module: when it started, its first tensor input,
    and its output tensors (cloned: an in-place activation would change them later)."""
    calls: dict[str, _Call] = {}
    started: dict[str, tuple[int, torch.Tensor | None]] = {}
    handles = []
    for name, module in model.named_modules():
        if name not in names:
            continue

        def before(mod: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            if name not in started:
                first = _tensors(list(args) + list(kwargs.values()))
                started[name] = (len(started), first[0].detach().clone() if first else None)

        def after(mod: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = name) -> None:
            if name not in calls and name in started:
                order, first = started[name]
                calls[name] = _Call(order, first, [t.detach().clone() for t in _tensors(out)])

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _run(model: nn.Module, args: list, kwargs: dict, which: str) -> Any:
    try:
        return model(*args, **kwargs)
    except Exception as exc:  # a model that rejects the inputs is a bad verify section
        raise UsageError(
            f"verify: the {which} model raised {type(exc).__name__}: {str(exc)[:300]}"
        ) from None


# -- comparing ---------------------------------------------------------------------------


def _errors(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float, float]:
    """Max absolute error, max error relative to the reference's largest value, and that
    largest value."""
    a, b = ref.double(), cand.double()
    if a.numel() == 0:
        return 0.0, 0.0, 0.0
    diff = (a - b).abs()
    bad = ~torch.isfinite(b) & torch.isfinite(a)
    max_abs = math.inf if bad.any() else float(diff.max())
    scale = float(a.abs().max())
    return max_abs, max_abs / scale if scale > 0 else max_abs, scale


def _agree(ref: torch.Tensor, cand: torch.Tensor, atol: float, rtol: float) -> bool:
    if ref.shape != cand.shape:
        return False
    if not ref.is_floating_point():
        return bool(torch.equal(ref, cand))
    max_abs, _, scale = _errors(ref, cand)
    return max_abs <= atol + rtol * scale


def compare_tensors(
    ref: torch.Tensor,
    cand: torch.Tensor,
    names: tuple[str, str],
    atol: float,
    rtol: float,
    logits: bool = False,
) -> Comparison:
    """Compare two outputs; ``logits`` also asks that the top-1 class agree."""
    if ref.shape != cand.shape:
        return Comparison(
            *names, math.inf, math.inf, False,
            note=f"shapes differ: {list(ref.shape)} vs {list(cand.shape)}",
        )  # fmt: skip
    max_abs, max_rel, _ = _errors(ref, cand)
    ok = _agree(ref, cand, atol, rtol)
    top1 = None
    if logits and ref.is_floating_point() and ref.dim() >= 2 and ref.shape[-1] > 1:
        top1 = float((ref.argmax(-1) == cand.argmax(-1)).double().mean())
        ok = ok and top1 >= TOP1_AGREEMENT
    return Comparison(*names, max_abs, max_rel, ok, top1)


# -- matching modules across the two models through the plan --------------------------


def _keys_under(model: nn.Module) -> dict[str, frozenset[str]]:
    """For each module with state, the state-dict keys it holds (its own and its children's)."""
    keys = list(model.state_dict().keys())
    out: dict[str, frozenset[str]] = {}
    for name, _ in model.named_modules():
        prefix = f"{name}." if name else ""
        held = frozenset(k for k in keys if k.startswith(prefix))
        if held:
            out[name] = held
    return out


@dataclass(frozen=True)
class _Carry:
    """How a candidate layer's output features come from reference layers' outputs: the
    reference outputs (features moved to the last dim) are concatenated in ``modules``
    order and ``index`` picks the candidate's features from them, in order."""

    modules: tuple[str, ...]
    dims: tuple[int, ...]  # each reference module's output feature dim
    dim: int  # the candidate's output feature dim
    index: torch.Tensor
    moves: str  # the plan's verbs, for the report

    def apply(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat([o.movedim(d, -1) for o, d in zip(outputs, self.dims, strict=True)], -1)
        return joined[..., self.index.to(joined.device)].movedim(-1, self.dim)


@dataclass
class _Pairing:
    """Candidate module -> reference module (or the reference layers its output features
    are carried from), and what the plan did to each candidate module."""

    pairs: dict[str, str]
    fresh: set[str]
    carried: dict[str, _Carry] = field(default_factory=dict)
    not_compared: dict[str, str] = field(default_factory=dict)

    def reference_modules(self) -> set[str]:
        return set(self.pairs.values()) | {m for c in self.carried.values() for m in c.modules}


def match_modules(
    reference: nn.Module,
    candidate: nn.Module,
    result_plan: Table,
    reference_table: Table,
    carry: bool = True,
) -> _Pairing:
    """Pair modules whose state comes from the same source keys: a candidate module matches
    the reference module holding exactly the keys its own keys were made from. A layer whose
    rows the plan moved (and a wrapper around only it) is carried instead (:class:`_Carry`;
    deriving one replays its weight's plan, so ``carry=False`` leaves them out); its
    ancestors pair as usual, since their outputs are not moved."""
    to_reference: dict[str, set[str]] = {}
    for name, ref in reference_table.items():
        for source in ref.sources:
            to_reference.setdefault(source, set()).add(name)
    by_keys: dict[frozenset[str], list[str]] = {}
    for name, held in _keys_under(reference).items():
        by_keys.setdefault(held, []).append(name)
    reference_modules = {n for names in by_keys.values() for n in names}

    pairing = _Pairing({}, set())
    carries: dict[str, _Carry | str] = {}
    plan = _with_tied(result_plan, candidate)
    for name, held in _keys_under(candidate).items():
        made_from: set[str] = set()
        new_values = 0
        moved: set[str] = set()
        for key in held:
            ref = plan.get(key)
            if ref is None or not ref.sources or _verbs(ref) & FRESH_VERBS:
                new_values += 1
                continue
            if _verbs(ref) & RELAYOUT_VERBS:
                moved.add(key.rpartition(".")[0])
            for source in ref.sources:
                made_from |= to_reference.get(source, set())
        if new_values == len(held):
            pairing.fresh.add(name)
        layer = next(iter(moved)) if len(moved) == 1 else None
        if layer is not None and all(k.startswith(f"{layer}." if layer else "") for k in held):
            # ``name`` is that layer, or a wrapper around it alone
            if not carry:
                continue
            if layer not in carries:
                carries[layer] = _carry(
                    candidate, reference, layer, plan, reference_table, to_reference
                )
            found = carries[layer]
            if isinstance(found, _Carry):
                pairing.carried[name] = found
            elif name == layer:
                pairing.not_compared[name] = found
            continue
        same = by_keys.get(frozenset(made_from))
        if same and new_values == 0:
            # Wrappers holding the same keys (a Sequential around one Linear) record the
            # same output: the outermost pairs with a container, the innermost with a leaf.
            pairing.pairs[name] = same[-1] if _is_leaf(candidate, name) else same[0]
        elif new_values == len(held) and name in reference_modules:
            pairing.pairs[name] = name  # a re-initialised module keeps its place and its name
    return pairing


def _with_tied(plan: Table, model: nn.Module) -> Table:
    """``plan`` with each name the model ties to a planned one (an embedding and its head)
    planned as that one: loading either sets both."""
    out = dict(plan)
    for name, group in tied_names(model).items():
        held = next((plan[n] for n in group if n in plan), None)
        if held is not None and name not in plan:
            out[name] = held
    return out


def _verbs(ref: TensorRef) -> set[str]:
    return {a.verb for a in ref.actions}


def feature_dims(module: nn.Module) -> tuple[int, int] | None:
    """(weight dim, output dim) of ``module``'s output features (:data:`FEATURE_DIMS`)."""
    for cls in type(module).__mro__:
        if cls.__name__ in FEATURE_DIMS:
            return FEATURE_DIMS[cls.__name__]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return 0, -1
    return None


def _carry(
    candidate: nn.Module,
    reference: nn.Module,
    layer: str,
    result_plan: Table,
    reference_table: Table,
    to_reference: dict[str, set[str]],
) -> _Carry | str:
    """Which reference output feature each output feature of ``layer`` is, derived by
    replaying the plan of its weight on element indices; or why that cannot be derived.

    Every element of the weight must come from the weight of a reference layer, and the
    elements of one output feature from one reference output feature, in the same places
    along the other dims (so the candidate's feature computes what the reference's did)."""
    dims = feature_dims(candidate.get_submodule(layer))
    plan = result_plan.get(f"{layer}.weight" if layer else "weight")
    if dims is None or plan is None:
        return f"{type(candidate.get_submodule(layer)).__name__}: no known output feature dim"
    if not _verbs(plan) <= MOVING_VERBS:
        return "its weight was computed by the plan, not moved: " + ", ".join(sorted(_verbs(plan)))
    starts: dict[str, tuple[int, int]] = {}  # source key -> (its first index, its numel)

    def indices(leaf: TensorRef) -> torch.Tensor:
        """A distinct number for every element of every source tensor the plan starts from."""
        key = leaf.sources[0] if len(leaf.sources) == 1 else ""
        if key not in starts:
            starts[key] = (sum(n for _, n in starts.values()), leaf.numel)
        start = starts[key][0]
        return torch.arange(start, start + leaf.numel, dtype=torch.int64).reshape(leaf.shape)

    index = replay(plan, indices)
    feature = torch.full(index.shape, -1, dtype=torch.int64)  # in the modules' joined features
    rest = torch.full(index.shape, -1, dtype=torch.int64)  # the place along the other dims
    modules: list[str] = []
    module_dims: list[int] = []
    offset = 0
    for key, (start, numel) in starts.items():
        names = to_reference.get(key, set())
        ref_key = next(iter(names)) if len(names) == 1 else None
        if ref_key is None or ref_key.rpartition(".")[2] != "weight":
            return f"its weight comes from {key!r}, which is no reference layer's weight"
        ref_layer = ref_key.rpartition(".")[0]
        ref_dims = feature_dims(reference.get_submodule(ref_layer))
        shape = reference_table[ref_key].shape
        if ref_dims is None:
            return f"reference {ref_layer}: no known output feature dim"
        if math.prod(shape) != numel or not _verbs(reference_table[ref_key]) <= RENAMING_VERBS:
            return f"reference {ref_key} is not {key!r} as the source holds it"
        if ref_layer in modules:
            return f"reference {ref_layer} is reached twice"
        d = ref_dims[0] % len(shape)
        if numel // shape[d] != index.numel() // index.shape[dims[0] % index.dim()]:
            return (
                f"its weight holds parts of reference {ref_layer}'s output features, not whole ones"
            )
        mask = (index >= start) & (index < start + numel)
        local = index[mask] - start
        inner = math.prod(shape[d + 1 :])
        feature[mask] = offset + (local // inner) % shape[d]
        rest[mask] = (local // (inner * shape[d])) * inner + local % inner
        modules.append(ref_layer)
        module_dims.append(ref_dims[1])
        offset += shape[d]
    d = dims[0] % index.dim()
    by_feature = feature.movedim(d, 0).reshape(index.shape[d], -1)
    places = rest.movedim(d, 0).reshape(index.shape[d], -1)
    expected = torch.arange(places.shape[1]).expand_as(places)
    if not (bool((by_feature == by_feature[:, :1]).all()) and torch.equal(places, expected)):
        return "the plan mixes its output features with other dims"
    moves = ", ".join(sorted(_verbs(plan) & RELAYOUT_VERBS))
    return _Carry(tuple(modules), tuple(module_dims), dims[1], by_feature[:, 0].clone(), moves)


def _is_leaf(model: nn.Module, name: str) -> bool:
    return not any(True for _ in model.get_submodule(name).children())


# -- localisation ------------------------------------------------------------------------


@dataclass
class _Trace:
    reference: dict[str, _Call]
    candidate: dict[str, _Call]
    pairing: _Pairing
    atol: float
    rtol: float

    def comparable(self, name: str) -> bool:
        if name not in self.candidate:
            return False
        carry = self.pairing.carried.get(name)
        if carry is not None:
            return all(self.reference.get(m) and self.reference[m].output for m in carry.modules)
        other = self.pairing.pairs.get(name)
        return other is not None and other in self.reference

    def reference_output(self, name: str) -> torch.Tensor | None:
        """What ``name`` should output: its reference module's output, or the reference
        outputs carried through the plan's moves."""
        carry = self.pairing.carried.get(name)
        if carry is None:
            out = self.reference[self.pairing.pairs[name]].output
            return out[0] if out else None
        try:
            return carry.apply([self.reference[m].output[0] for m in carry.modules])
        except (RuntimeError, IndexError):  # outputs not shaped as the layers' weights say
            return None

    def reference_name(self, name: str) -> str:
        carry = self.pairing.carried.get(name)
        return ", ".join(carry.modules) if carry else self.pairing.pairs[name]

    def reference_call(self, name: str) -> _Call:
        carry = self.pairing.carried.get(name)
        return self.reference[carry.modules[0] if carry else self.pairing.pairs[name]]

    def outputs_agree(self, name: str) -> bool:
        ref, cand = self.reference_output(name), self.candidate[name].output
        return ref is not None and bool(cand) and _agree(ref, cand[0], self.atol, self.rtol)

    def shapes_match(self, name: str) -> bool:
        ref, cand = self.reference_output(name), self.candidate[name].output
        return ref is not None and bool(cand) and ref.shape == cand[0].shape

    def inputs_agree(self, name: str) -> bool:
        ref = self.reference_call(name).input
        cand = self.candidate[name].input
        return ref is not None and cand is not None and _agree(ref, cand, self.atol, self.rtol)

    def children(self, parent: str) -> list[str]:
        """Comparable modules whose nearest comparable ancestor is ``parent``, in call order."""
        prefix = f"{parent}." if parent else ""
        inner = [
            n for n in self.candidate if n != parent and n.startswith(prefix) and self.comparable(n)
        ]
        direct = [n for n in inner if not any(n.startswith(f"{m}.") for m in inner if m != n)]
        return sorted(direct, key=lambda n: self.candidate[n].order)

    def out_of_order(self, name: str, siblings: list[str]) -> bool:
        """Was this module paired with a reference module that runs at another place among
        its siblings (weights moved between blocks)?"""
        order = {n: self.reference_call(n).order for n in siblings}
        here = siblings.index(name)
        before, after = siblings[:here], siblings[here + 1 :]
        return any(order[s] > order[name] for s in before) or any(
            order[s] < order[name] for s in after
        )

    def comparison(self, name: str, note: str | None = None) -> Comparison:
        carry = self.pairing.carried.get(name)
        other = self.reference_name(name)
        if carry and not note:
            note = f"reference outputs carried through the plan's {carry.moves}"
        reference = self.reference_output(name)
        assert reference is not None  # only comparisons of matching shapes are made
        found = compare_tensors(
            reference, self.candidate[name].output[0], (other, name), self.atol, self.rtol
        )
        return Comparison(
            found.reference, found.candidate, found.max_abs_err, found.max_rel_err, False,
            note=note or found.note,
        )  # fmt: skip

    def first_divergence(self, node: str = "") -> Comparison | None:
        """Descend from ``node`` to the module that introduces the difference."""
        children = self.children(node)
        siblings = [c for c in children if self.shapes_match(c)]
        for child in children:
            if child in self.pairing.fresh:  # reached only when everything before agreed
                return self.comparison(child, "re-initialised by the plan: expected to differ")
            if child not in siblings or self.outputs_agree(child):
                continue
            if self.inputs_agree(child):
                return self.first_divergence(child) or self.comparison(child)
            if self.out_of_order(child, siblings):
                return self.comparison(
                    child,
                    f"its weights come from reference {self.reference_name(child)}, which runs "
                    "at another place",
                )
            break  # the difference arises in ``node``'s own computation, between children
        if self.comparable(node) and self.shapes_match(node) and not self.outputs_agree(node):
            return self.comparison(node, self.moved_inside(node))
        return None

    def moved_inside(self, node: str) -> str | None:
        """A note for a module that diverges where its parts whose rows the plan moved
        agree: each computes the right features, in places that the module's own
        computation (rotary pairs, head groups) then reads wrongly."""
        prefix = f"{node}." if node else ""
        moved = {
            n.removeprefix(prefix): c.moves
            for n, c in self.pairing.carried.items()
            if n.startswith(prefix) and self.comparable(n) and self.outputs_agree(n)
        }
        if not moved:
            return None
        names = ", ".join(f"{n} ({m})" for n, m in sorted(moved.items()))
        return (
            f"the plan moved the rows of {names}, which agree as moved: a wrong head count "
            "or part order there shows only here"
        )


# -- the step -----------------------------------------------------------------------------


def _named_output(
    model: nn.Module, name: str, calls: dict[str, _Call], args: list, kwargs: dict, which: str
) -> torch.Tensor:
    """A ``compare`` entry's output: a submodule's (recorded), or a method's (called)."""
    if name in calls and calls[name].output:
        return calls[name].output[0]
    try:
        model.get_submodule(name)
    except AttributeError:
        method = getattr(model, name, None)
        if callable(method) and not isinstance(method, nn.Module):
            return output_tensor(_run(method, args, kwargs, which))
        raise UsageError(
            f"verify.compare: the {which} model has no module or method {name!r}"
        ) from None
    raise UsageError(f"verify.compare: the {which} model's module {name!r} was not called")


def _least_precise(table: Table) -> torch.dtype:
    floats = {ref.dtype for ref in table.values() if ref.dtype.is_floating_point}
    return max(floats, key=lambda d: TOLERANCES.get(d, (0.0, 0.0))[1], default=torch.float32)


def verify(
    spec: VerifySpec,
    *,
    seed: int,
    base_dir: str,
    source: SourceSpec,
    target: TargetSpec,
    result: Table,
    result_plan: Table,
) -> VerifyResult:
    """Load the source into the reference model and ``result`` (the written checkpoint, or
    the plan's own table) into the target model, run both, and compare; ``result_plan`` is
    the plan that made ``result`` (its history pairs the modules)."""
    assert target.model, "verify: needs target.model (checked when the rules file is read)"
    device = _device(spec.device)
    reference = build_model(spec.reference.model, spec.reference.kwargs, base_dir, device="cpu")
    candidate = build_model(target.model, target.kwargs, base_dir, device="cpu")
    source_table = open_checkpoint(source.path, source.key, source.allow_globals).tensors
    reference_table, _ = run_rules(
        RulesFile(rules=list(spec.reference.rules), seed=seed),
        source_table,
        TargetInfo("reference", expected_from_model(reference), reference),
    )
    _load(reference, reference_table, f"verify.reference: the source {source.path}")
    _load(candidate, result, "the result")

    default_atol, default_rtol = TOLERANCES.get(_least_precise(result_plan), (1e-5, 1e-4))
    atol = spec.atol if spec.atol is not None else default_atol
    rtol = spec.rtol if spec.rtol is not None else default_rtol
    pairing = match_modules(reference, candidate, result_plan, reference_table, carry=False)
    named = [c for c in spec.compare if isinstance(c, ModulePair)]
    args, kwargs = make_inputs(spec, seed, base_dir, device)
    named_inputs = {f"inputs[{i}]": a for i, a in enumerate(args)} | kwargs
    warned = input_warnings(named_inputs, result_plan, candidate, _highs(spec))
    for text in warned:
        warnings.warn(text, VerifyInputsWarning, stacklevel=2)

    with torch.no_grad():
        for model in (reference, candidate):
            model.to(device).eval()
        # The common case passes: record only what ``compare`` names. Every matched
        # module's output is recorded in a second run, only to explain a failure.
        watch_ref, watch_cand = {c.reference for c in named}, {c.candidate for c in named}
        with _recording(reference, watch_ref) as ref_calls:
            ref_out = _run(reference, args, kwargs, "reference")
        with _recording(candidate, watch_cand) as cand_calls:
            cand_out = _run(candidate, args, kwargs, "candidate")

        compared = []
        for item in spec.compare:
            if isinstance(item, ModulePair):
                r = _named_output(reference, item.reference, ref_calls, args, kwargs, "reference")
                c = _named_output(candidate, item.candidate, cand_calls, args, kwargs, "candidate")
                names = (item.reference, item.candidate)
                compared.append(compare_tensors(r, c, names, atol, rtol))
            else:
                r, c = output_tensor(ref_out), output_tensor(cand_out)
                logits = hasattr(ref_out, "logits") or hasattr(cand_out, "logits")
                compared.append(compare_tensors(r, c, ("output", "output"), atol, rtol, logits))
        del ref_out, cand_out, ref_calls, cand_calls
        ok = all(c.ok for c in compared)
        first = None
        if not ok:
            pairing = match_modules(reference, candidate, result_plan, reference_table)
            with _recording(reference, pairing.reference_modules() | {""}) as ref_calls:
                _run(reference, args, kwargs, "reference")
            watched = set(pairing.pairs) | set(pairing.carried) | {""}
            with _recording(candidate, watched) as cand_calls:
                _run(candidate, args, kwargs, "candidate")
            first = _Trace(ref_calls, cand_calls, pairing, atol, rtol).first_divergence()
    fresh = sorted(n for n in pairing.fresh if _is_leaf(candidate, n))
    return VerifyResult(ok, compared, atol, rtol, first, fresh, pairing.not_compared, warned)


def raise_if_failed(result: VerifyResult, report: Any = None) -> None:
    """VerifyFailed (exit 4) naming what diverged, carrying ``report`` for --json."""
    if result.ok:
        return
    bad = [c for c in result.compared if not c.ok]
    message = "verification failed: the result does not compute what the source computed\n  "
    message += "\n  ".join(c.line() for c in bad)
    if result.first_divergence is not None:
        message += "\n  first module to diverge: " + result.first_divergence.line()
    message += "".join(
        f"\n  not compared: {name} ({why})" for name, why in result.not_compared.items()
    )
    raise VerifyFailed(message, report)


class VerifyFailed(VerifyError):
    """Verification failed; carries the report for --json and --report."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report
