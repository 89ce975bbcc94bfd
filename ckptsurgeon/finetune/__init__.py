"""The built-in frozen-backbone fine-tune runner (``finetune:`` in a rules file)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ckptsurgeon.errors import UsageError


def finetune_from_rules(
    rules,
    base_dir: str,
    *,
    weights: str | None = None,
    resume: bool = False,
    log=print,
    key: str | None = None,
    allow_globals: Iterable[str] = (),
) -> dict[str, Any]:
    """Build the model a rules file's ``finetune:`` names, load its weights, and train it.

    ``weights`` defaults to ``finetune.weights``, then to the rules file's output; ``key``
    and ``allow_globals`` are how to read them (see :func:`ckptsurgeon.load_into`).
    """
    from ckptsurgeon.engine.load import load_into
    from ckptsurgeon.finetune.runner import run_finetune
    from ckptsurgeon.paths import resolve
    from ckptsurgeon.targets.spec import build_model

    spec = rules.finetune
    if spec is None:
        raise UsageError("this file has no finetune: section")
    target = rules.target
    model_spec = spec.model or (target.model if target else None)
    if not model_spec:
        raise UsageError("finetune.model is not set and there is no target.model to default to")
    kwargs = (
        spec.kwargs
        if spec.kwargs is not None
        else (target.kwargs if target and target.model == model_spec else {})
    )
    weights = weights or (resolve(spec.weights, base_dir) if spec.weights else None)
    if weights is None and rules.output_spec.path:
        weights = resolve(rules.output_spec.path, base_dir)
    model = build_model(model_spec, kwargs, base_dir, device="cpu")
    if weights is not None:
        if not os.path.exists(weights):
            raise UsageError(
                f"finetune weights {weights} do not exist (run apply first, or set "
                "finetune.weights)"
            )
        load_into(model, weights, key=key, allow_globals=allow_globals)
        log(f"fine-tuning {model_spec} from {weights}")
    else:
        log(f"fine-tuning {model_spec} from its own initialisation (no weights given)")
    return run_finetune(
        spec, model, base_dir=base_dir, resume=resume, log=log, source=weights or model_spec
    )
