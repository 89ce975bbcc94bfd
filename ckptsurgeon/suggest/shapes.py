"""Step 3 of the inference: same name, other shape; and the fresh values that step 4 reuses.

Once names agree, a shape that still differs is either a first conv whose input channels
changed 3 -> N (adapted as timm does, so the trained filters survive) or a layer that was
meant to change (a new classifier head), which takes the target's fresh values. Filling
what only the target has (:mod:`~ckptsurgeon.suggest.leftovers`) needs the same fresh
values, so :func:`fresh` lives here, beside its first user.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ckptsurgeon.formats.table import Table
from ckptsurgeon.suggest import names as nm
from ckptsurgeon.suggest.state import Rule, State
from ckptsurgeon.targets.spec import Expected

# 1-D keys that are multiplied in, not added: a norm's scale (LayerNorm, BatchNorm, RMSNorm,
# GPT-2's ln_1, timm's gamma) or a running variance. Fresh ones start at one, as torch's do.
_ONES = re.compile(
    r"(?:^|\.)(?:[^.]*(?:norm|ln|bn)[^.]*\.(?:weight|scale)|gamma|running_var)$", re.IGNORECASE
)


def shapes(state: State) -> None:
    """Same name, other shape: adapt a changed stem, else take the target's fresh values."""
    mismatched = [
        n
        for n, ref in state.table.items()
        if n in state.expected and ref.shape != state.expected[n][0] and not state.held(n)
    ]
    adapt: dict[int, list[str]] = defaultdict(list)
    fresh_names: list[str] = []
    for name in mismatched:
        old, new = state.table[name].shape, state.expected[name][0]
        stem = (
            len(old) >= 3
            and len(old) == len(new)
            and old[0] == new[0]
            and old[2:] == new[2:]
            and (old[1] == 3 or new[1] == 1)
        )
        (adapt[new[1]] if stem else fresh_names).append(name)
    for channels, names in adapt.items():
        groups = nm.cover(names, [n for n in state.table if n not in set(names)])
        before = sorted({state.table[n].shape[1] for n in names})
        state.add(
            "adapt",
            {
                "op": "adapt_input_channels",
                "pattern": nm.one_pattern(groups),
                "channels": channels,
            },
            f"{nm.labels(groups)}: {'/'.join(map(str, before))} -> {channels} input channels "
            "(adapted as timm does: summed for 1, else repeated and rescaled by 3/N)",
        )
    if fresh_names:
        fresh(
            state,
            "reinit_mismatched",
            fresh_names,
            _shape_changes(state.table, state.expected, fresh_names),
        )


def fresh(state: State, op: str, names: list[str], why: str) -> None:
    """reinit_mismatched / fill_missing for ``names``: the model's own initialisation,
    or, with no model to ask (a checkpoint or manifest target), ``normal`` for weights
    of two or more dimensions, ``ones`` for what looks like a norm's scale or a running
    variance (zeros there would silence the layer), and ``zeros`` for the rest."""
    if state.target.model is not None:
        parts: list[tuple[list[str], str | None]] = [(names, None)]
    else:
        weights = [n for n in names if len(state.expected[n][0]) >= 2]
        scales = [n for n in names if n not in set(weights) and _ONES.search(n)]
        rest = [n for n in names if n not in {*weights, *scales}]
        parts = [(weights, "normal"), (scales, "ones"), (rest, "zeros")]
    universe = state.expected if op == "fill_missing" else state.table
    for chosen, init in parts:
        if not chosen:
            continue
        groups = nm.cover(chosen, [n for n in universe if n not in set(chosen)])
        rule: Rule = {"op": op, "pattern": nm.one_pattern(groups)}
        values = "fresh values, initialised as the target model initialises them"
        if init:
            rule["init"] = init
            values = f"fresh values, init {init} (no model to initialise from; edit to taste)"
        kind = "reinit" if op == "reinit_mismatched" else "fill"
        state.add(kind, rule, f"{why}: {values}")


def _shape_changes(table: Table, expected: Expected, names: list[str]) -> str:
    """``fc.*: 1000 -> 10 along dim 0`` per module, for the keys whose shapes differ."""
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_module[nm.module_of(name)].append(name)
    parts: list[str] = []
    for module, keys in by_module.items():
        label = f"{module}.*" if module else ", ".join(keys)
        changes = {
            (d, a, b)
            for n in keys
            for d, (a, b) in enumerate(zip(table[n].shape, expected[n][0], strict=False))
            if a != b and len(table[n].shape) == len(expected[n][0])
        }
        same_rank = all(len(table[n].shape) == len(expected[n][0]) for n in keys)
        if same_rank and len(changes) == 1:
            ((d, a, b),) = changes
            parts.append(f"{label}: {a} -> {b} along dim {d}")
        else:
            parts.append(
                f"{label}: "
                + ", ".join(f"{list(table[n].shape)} -> {list(expected[n][0])}" for n in keys[:3])
            )
    return "; ".join(parts[:4]) + (
        f"; ... ({len(parts) - 4} more modules)" if len(parts) > 4 else ""
    )
