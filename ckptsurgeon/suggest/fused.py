"""Step 2 of the inference: split or merge fused attention projections.

timm and GPT-2 keep one ``qkv`` tensor where BERT and Llama keep ``q``, ``k`` and ``v``; no
prefix rewrite bridges the two, and the names alone cannot say which tensor is which. So a
split or merge is suggested only when the parts' shapes add up to exactly one tensor, under
the parts' own parent module (else anywhere in the same block), and anything less certain
is reported instead. Rows are taken in q, k, v order; GPT-NeoX's ``query_key_value``
interleaves the heads, so a split by rows would scramble it, and it is reported too.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ckptsurgeon.suggest import names as nm
from ckptsurgeon.suggest.state import Rule, State, Unresolved, either

# Fused projections whose rows are not [q; k; v] blocks (GPT-NeoX interleaves per head):
# a split by shape alone would scramble them.
INTERLEAVED_FUSED = {"query_key_value"}

Shapes = dict[str, tuple[int, ...]]
Triple = tuple[str, str, str]  # the (q, k, v) module names
Instance = tuple[str, str, str]  # (parts' parent, fused module, leaf)
# (parts' parent skeleton, fused module skeleton, the parts' modules, their sizes): the
# instances that share one are written as one rule
Family = tuple[str, str, Triple, tuple[int, ...]]


def fuse(state: State) -> None:
    """``qkv`` <-> ``q, k, v``: split where the target has the parts, merge where the
    checkpoint has them, when exactly one tensor's shape is their concatenation: under
    the parts' own parent, else anywhere in the same block (``attn.qkv`` against
    ``attention.q_proj``)."""
    extra, missing = state.unmatched()
    target_shape = {n: state.expected[n][0] for n in missing}
    source_shape = {n: state.table[n].shape for n in extra}
    for kind, parts, fused in (
        ("split", target_shape, source_shape),
        ("merge", source_shape, target_shape),
    ):
        instances: dict[Family, list[Instance]] = defaultdict(list)
        for (parent, leaf), modules in _qkv_triples(parts).items():
            found = _fused_partner(state, parent, leaf, modules, parts, fused)
            if found is not None:
                whole, sizes = found
                key = (
                    nm.skeleton(_dotted(parent)),
                    nm.skeleton(_dotted(whole)),
                    modules,
                    sizes,
                )
                instances[key].append((parent, whole, leaf))
        for (_, _, modules, sizes), where in instances.items():
            _fuse_rules(state, kind, modules, sizes, where)


def _fused_partner(
    state: State,
    parent: str,
    leaf: str,
    modules: Triple,
    parts: Shapes,
    fused: Shapes,
) -> tuple[str, tuple[int, ...]] | None:
    """The one fused module (its path) near ``parent`` whose ``leaf`` is the parts'
    concatenation along dim 0, with the parts' sizes; several are reported."""
    shapes = [parts[_join(parent, m, leaf)] for m in modules]
    if len({s[1:] for s in shapes}) != 1 or any(not s for s in shapes):
        return None
    whole = (sum(s[0] for s in shapes), *shapes[0][1:])
    fitting = [
        name
        for name, shape in fused.items()
        if shape == whole and name.rsplit(".", 1)[-1] == leaf and "." in name
    ]
    block = nm.module_of(parent)
    partners = [n for n in fitting if nm.module_of(nm.module_of(n)) == parent]
    if not partners and parent:
        partners = [
            n
            for n in fitting
            if block in (nm.module_of(nm.module_of(n)), nm.module_of(nm.module_of(nm.module_of(n))))
        ]
    if not partners:
        return None
    names = [_join(parent, m, leaf) for m in modules]
    module = nm.module_of(partners[0]).rsplit(".", 1)[-1]
    if len(partners) > 1:
        reason = (
            f"ambiguous: {', '.join(names)} could be split from or merged into "
            f"{either(partners)}; not guessed"
        )
    elif module in INTERLEAVED_FUSED:
        reason = (
            f"'{partners[0]}' fuses {', '.join(names)}, but '{module}' interleaves the "
            "heads (GPT-NeoX style), so a split by rows would scramble them; convert it "
            "by hand (reshape per head, then split)"
        )
    else:
        return nm.module_of(partners[0]), tuple(s[0] for s in shapes)
    state.hold([*names, *partners])
    state.unresolved.append(Unresolved([*names, *partners], reason))
    return None


def _fuse_rules(
    state: State,
    kind: str,
    modules: Triple,
    sizes: tuple[int, ...],
    where: list[Instance],
) -> None:
    """One split or merge for every (parts' parent, fused module, leaf) of one family,
    with layer indices generalised when both sides carry the same ones."""
    pairs = {(parent, whole) for parent, whole, _ in where}
    same_indices = all(nm.indices(_dotted(p)) == nm.indices(_dotted(w)) for p, w in pairs)
    if len(pairs) > 1 and not same_indices:
        for pair in sorted(pairs):
            _fuse_rules(state, kind, modules, sizes, [i for i in where if i[:2] == pair])
        return
    parent, whole, _ = where[0]
    generalise = len(pairs) > 1
    groups = len(nm.indices(_dotted(parent))) if generalise else 0
    leaves = "(" + "|".join(re.escape(lf) for lf in sorted({lf for *_, lf in where})) + ")"
    parts_label = nm.glob(_dotted(parent), generalise=generalise)[:-1] if parent else ""
    whole_label = nm.glob(_dotted(whole), generalise=generalise)
    if kind == "split":
        out = nm.prefix_replacement(_dotted(parent), generalise=generalise)
        rule: Rule = {
            "op": "split",
            "pattern": nm.prefix_regex(_dotted(whole), generalise=generalise) + leaves + "$",
            "into": [out + m + rf".\g<{groups + 1}>" for m in modules],
            "dim": 0,
        }
        if len(set(sizes)) > 1:
            rule["sizes"] = list(sizes)
        summary = (
            f"'{whole_label}' is fused in the checkpoint; the target has "
            f"'{parts_label}{{{','.join(modules)}}}.*': split along dim 0 into "
            f"{list(sizes)} (rows taken to be q, k, v in that order)"
        )
    else:
        head = nm.prefix_regex(_dotted(parent), generalise=generalise) if parent else "^"
        rule = {
            "op": "merge",
            "pattern": head + "(" + "|".join(map(re.escape, modules)) + r")\." + leaves + "$",
            "group": groups + 1,
            "order": list(modules),
            "into": nm.prefix_replacement(_dotted(whole), generalise=generalise)
            + rf"\g<{groups + 2}>",
            "dim": 0,
        }
        summary = (
            f"'{parts_label}{{{','.join(modules)}}}.*' are separate in the checkpoint; "
            f"the target fuses them as '{whole_label}': merged along dim 0 in q, k, v order"
        )
    state.add(kind, rule, summary)


def _qkv_triples(shapes: Shapes) -> dict[tuple[str, str], Triple]:
    """(parent, leaf) -> the (q, k, v) module names under ``parent`` holding ``leaf``, for
    parents where each role is named by exactly one module (``q_proj``, ``key``, ``wv``)."""
    roles: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in shapes:
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        role = nm.role(module) if module_path else None
        if role:
            roles[(parent, leaf)][role].append(module)
    return {
        key: (found["q"][0], found["k"][0], found["v"][0])
        for key, found in roles.items()
        if set(found) == {"q", "k", "v"} and all(len(m) == 1 for m in found.values())
    }


def _join(*parts: str) -> str:
    """A dotted name from its parts, skipping the empty parent of a top-level module."""
    return ".".join(p for p in parts if p)


def _dotted(parent: str) -> str:
    """A module path as a prefix: ``"blocks.0.attn"`` -> ``"blocks.0.attn."``."""
    return parent + "." if parent else ""
