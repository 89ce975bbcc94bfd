"""Step 4 of the inference: what is still unmatched once names, fused projections and shapes
are settled.

Target keys nothing maps to are filled fresh and checkpoint keys with no counterpart are
dropped, except leftovers that look like one tensor under two names (a whole module with the
same tensors, or a key of two or more dimensions with the same shape): those are reported,
because filling them would silently replace trained weights with random ones. Drops are
kept apart from the other findings (``state.drops``) and on the checkpoint's own names, so
that :func:`~ckptsurgeon.suggest.infer.infer_rules` can list them first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection

from ckptsurgeon.formats.table import dtype_name
from ckptsurgeon.suggest import names as nm
from ckptsurgeon.suggest.shapes import fresh
from ckptsurgeon.suggest.state import Finding, State, Unresolved, either
from ckptsurgeon.targets.check import group_names
from ckptsurgeon.targets.spec import Expected

# Leaf names of buffers that models register as non-persistent in current versions but
# older checkpoints still carry (transformers < 4.31 saved position_ids, for instance).
NON_PERSISTENT_HINTS = {"position_ids", "token_type_ids", "inv_freq", "masked_bias"}

MAX_DROP_RULES = 12

Signature = tuple[tuple[str, tuple[int, ...]], ...]  # a module's sorted (leaf, shape) pairs


def leftovers(state: State) -> None:
    """Fill what only the target has, drop what only the checkpoint has, except what
    looks like a match the names do not show."""
    extra, missing = state.unmatched()
    if (extra or missing) and state.matched(state.table) == 0:
        state.hold([*extra, *missing])
        state.unresolved.append(
            Unresolved(
                [],
                "no checkpoint key corresponds to a target key by name, even after "
                "trying every whole-segment prefix; nothing to build rules on",
            )
        )
        return
    _hold_lookalikes(state, extra, missing)
    extra, missing = state.unmatched()
    for group in nm.cover(missing, [t for t in state.expected if t not in set(missing)]):
        fresh(state, "fill_missing", list(group.names), _only_in_target(group, state.expected))
    if extra:
        _drop(state, extra)
    _dtype_note(state)


def _hold_lookalikes(state: State, extra: list[str], missing: list[str]) -> None:
    """Leftovers that may be one tensor under two names are reported, not filled: a
    wholly unmatched target module whose tensors (leaf names and shapes) are exactly
    those of a wholly unmatched checkpoint module (``norm`` renamed ``ln``), and a
    target key with the shape of a checkpoint key, for shapes of two or more dimensions
    (``pos_embed`` and ``position_embeddings``), where a coincidence is unlikely."""
    _hold_module_lookalikes(state, extra, missing)
    extra, missing = state.unmatched()
    by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name in extra:
        shape = state.table[name].shape
        if len(shape) >= 2:
            by_shape[shape].append(name)
    for target in missing:
        shape = state.expected[target][0]
        alike = by_shape.get(shape, [])
        if alike:
            state.hold([target, *alike])
            state.unresolved.append(
                Unresolved(
                    [target, *alike],
                    f"target key '{target}' {list(shape)} has no match by name, but "
                    f"{either(alike[:3])} has its shape: renamed? Not guessed: add a map "
                    "rule (or drop and fill_missing explicitly)",
                )
            )


def _hold_module_lookalikes(state: State, extra: list[str], missing: list[str]) -> None:
    """Whole modules that hold the same tensors on both sides, one report per family of
    target modules (``blocks.#.norm``), since a renamed module is renamed in every block."""
    sources = _whole_modules(extra, state.table, {n: r.shape for n, r in state.table.items()})
    targets = _whole_modules(
        missing, state.expected, {n: s for n, (s, _) in state.expected.items()}
    )
    by_signature: dict[Signature, list[str]] = defaultdict(list)
    for module, (signature, _) in sources.items():
        by_signature[signature].append(module)
    skeleton = {m: nm.skeleton(m + ".") for m in [*sources, *targets]}
    # target family (blocks.#.norm.) -> its modules, and the look-alike checkpoint
    # modules by family
    families: dict[str, tuple[set[str], dict[str, set[str]]]] = {}
    for module, (signature, _) in targets.items():
        for alike in by_signature.get(signature, []):
            mine, theirs = families.setdefault(skeleton[module], (set(), defaultdict(set)))
            mine.add(module)
            theirs[skeleton[alike]].add(alike)
    for mine, theirs in families.values():
        names = [n for m in sorted(mine) for n in targets[m][1]]
        names += [n for group in theirs.values() for m in sorted(group) for n in sources[m][1]]
        state.hold(names)
        many = len(mine) > 1
        shown = nm.glob(min(mine) + ".", generalise=many)
        others = [nm.glob(min(g) + ".", generalise=len(g) > 1) for g in theirs.values()]
        state.unresolved.append(
            Unresolved(
                names,
                f"target module '{shown}'"
                + (f" ({len(mine)} modules)" if many else "")
                + " has no match by name, but checkpoint module "
                + either(others)
                + (" hold" if len(others) > 1 else " holds")
                + " the same tensors: renamed? Not guessed: add a rename rule (or drop "
                "and fill_missing explicitly)",
            )
        )


def _drop(state: State, extra: list[str]) -> None:
    """Drop rules on the checkpoint's own names for every key with no counterpart."""
    derived: dict[str, list[str]] = defaultdict(list)
    for name, ref in state.table.items():
        for source in ref.sources:
            derived[source].append(name)
    gone = set(extra)
    dropped = [s for s in state.source if derived.get(s) and set(derived[s]) <= gone]
    if not dropped:
        return
    groups = nm.cover(dropped, [s for s in state.source if s not in set(dropped)])
    if len(groups) > MAX_DROP_RULES:
        merged = nm.Group(nm.one_pattern(groups), nm.labels(groups[:6]) + ", ...", tuple(dropped))
        groups = [merged]
    for group in groups:
        state.drops.append(
            Finding(
                "drop",
                f"{group.label}: absent from the target ({_drop_reason(group.names)})",
                len(group.names),
                {"op": "drop", "pattern": group.pattern},
            )
        )
    state.table = {n: r for n, r in state.table.items() if n not in gone}


def _dtype_note(state: State) -> None:
    """A note, with no rule, for keys that match but differ in dtype: loading casts them,
    so they need nothing, but a person reading the diff should know the file differs."""
    pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, ref in state.table.items():
        if name in state.expected and ref.shape == state.expected[name][0]:
            want = state.expected[name][1]
            if ref.dtype != want:
                pairs[(dtype_name(ref.dtype), dtype_name(want))].append(name)
    for (have, want), names in pairs.items():
        state.notes.append(
            Finding(
                "dtype",
                f"{group_names(names, 4)}: {have} in the checkpoint, {want} in the target; "
                "load_state_dict casts them (a cast rule or output.dtype changes the file)",
                len(names),
            )
        )


def _whole_modules(
    names: list[str], universe: Collection[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[Signature, list[str]]]:
    """Modules all of whose own tensors are among ``names``: module -> (signature, keys),
    the signature being its sorted (leaf, shape) pairs."""
    chosen = set(names)
    members: dict[str, list[str]] = defaultdict(list)
    for name in universe:
        members[nm.module_of(name)].append(name)
    return {
        module: (tuple(sorted((n.rsplit(".", 1)[-1], shapes[n]) for n in keys)), keys)
        for module, keys in members.items()
        if module and chosen.issuperset(keys)
    }


def _only_in_target(group: nm.Group, expected: Expected) -> str:
    """Why a group is filled: BatchNorm step counters get their usual excuse, so the
    commonest harmless fill does not read like lost weights; else the values it adds."""
    params = sum(math.prod(expected[n][0]) for n in group.names)
    if all(n.endswith("num_batches_tracked") for n in group.names):
        what = "BatchNorm step counters the checkpoint lacks (FrozenBatchNorm2d does not save them)"
    else:
        what = f"only the target has them ({params:,} values)"
    return f"{group.label}: {what}"


def _drop_reason(names: Collection[str]) -> str:
    """Why a group is dropped, in the terms a person would check it by: an EMA copy
    next to the raw weights, buffers the target no longer saves, or nothing alike."""
    if all(nm.mentions_ema(n.rpartition(".")[0] + ".") for n in names):
        return "an EMA copy; the raw weights are used"
    if all(n.rsplit(".", 1)[-1] in NON_PERSISTENT_HINTS for n in names):
        return "buffers the target does not save: non-persistent there"
    return "no counterpart"
