"""Loading a checkpoint into a live model: rules applied, then a strict load."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ckptsurgeon.engine.plan import run_rules
from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.reader import open_checkpoint
from ckptsurgeon.rules.document import parse_rules
from ckptsurgeon.targets.check import check_table
from ckptsurgeon.targets.spec import TargetInfo, expected_from_model


def load_into(
    model,
    path: str | os.PathLike,
    *,
    rules: list[dict] | None = None,
    key: str | None = None,
    strict: bool = True,
    seed: int = 0,
    allow_globals: Iterable[str] = (),
    assign: bool = False,
):
    """Load ``path`` into ``model`` after applying ``rules`` (a list of op dicts).

    With ``strict`` (the default) anything missing, unexpected or mis-shaped raises
    FitError listing it, before any parameter is touched. ``assign`` (as in
    ``load_state_dict``) makes the loaded tensors the model's own: the way to fill a model
    built on the meta device. Returns torch's ``_IncompatibleKeys``.
    """
    spec = parse_rules({"rules": rules or [], "seed": seed}, "load_into(rules=...)")
    target = TargetInfo(f"model {type(model).__name__}", expected_from_model(model), model)
    table, _ = run_rules(spec, open_checkpoint(path, key, allow_globals).tensors, target)
    result = check_table(table, target)
    if strict and not result.ok:
        raise FitError(
            f"{path} does not load strictly into {type(model).__name__}:\n  "
            + "\n  ".join(result.lines())
        )
    state = {name: ref.load() for name, ref in table.items()}
    for name, partner in result.tied:  # one tensor under both names: torch wants both
        state[name] = state[partner]
    incompatible = model.load_state_dict(state, strict=strict, assign=assign)
    if assign:  # assign gives each name a Parameter of its own: share the tied ones again
        target.retie(model)
    return incompatible
