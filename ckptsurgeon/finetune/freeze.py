"""Choosing and freezing the backbone, with BatchNorm that really stays frozen.

``requires_grad=False`` does not stop BatchNorm from updating its running statistics in
train mode, and a parent's ``.train()`` re-enables train mode on every child. Frozen
BatchNorm modules therefore get their own ``train`` that always stays in eval, until the
phase that unfreezes them removes it.
"""

from __future__ import annotations

import re
import types

from torch import nn

from ckptsurgeon.errors import UsageError
from ckptsurgeon.rules.finetune import FreezeSpec

_NORM_WITH_STATS = (nn.modules.batchnorm._BatchNorm,)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def backbone_names(model: nn.Module, spec: FreezeSpec) -> set[str]:
    """Parameter names the freeze spec selects: modules, patterns and the first N children,
    minus anything matching ``except``."""
    names = [n for n, _ in model.named_parameters()]
    prefixes = list(spec.modules)
    for path in spec.modules:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise UsageError(f"freeze.modules: the model has no module {path!r}") from None
    if spec.first_children:
        children = [n for n, _ in model.named_children()]
        if spec.first_children > len(children):
            raise UsageError(
                f"freeze.first_children: {spec.first_children}, but the model has "
                f"{len(children)} children ({', '.join(children)})"
            )
        prefixes += children[: spec.first_children]
    patterns = [re.compile(p) for p in spec.patterns]
    excepts = [re.compile(p) for p in spec.except_]
    selected = {
        n for n in names
        if any(_under(n, p) for p in prefixes) or any(r.search(n) for r in patterns)
    }  # fmt: skip
    return {n for n in selected if not any(r.search(n) for r in excepts)}


def unfrozen_names(
    model: nn.Module, backbone: set[str], selectors: list[str], where: str
) -> set[str]:
    """The backbone parameters a phase's ``unfreeze`` selects: everything under a module
    path, or every parameter name a regex matches. UsageError for a selector that selects
    nothing, or anything outside the backbone (that trains in every phase anyway)."""
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for selector in selectors:
        try:
            model.get_submodule(selector)
            found = {n for n in names if _under(n, selector)}
        except AttributeError:
            found = {n for n in names if re.search(selector, n)}
        if not found:
            raise UsageError(
                f"{where}: unfreeze {selector!r} names no module and matches no parameter"
            )
        outside = sorted(found - backbone)
        if outside:
            raise UsageError(
                f"{where}: unfreeze {selector!r} reaches outside the frozen backbone "
                f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}), which "
                "trains anyway"
            )
        chosen |= found
    return chosen


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def set_frozen(model: nn.Module, backbone: set[str], frozen: bool, train_bn: bool) -> list[str]:
    """Freeze (or unfreeze) the backbone; returns the BatchNorm modules locked in eval."""
    for name, param in model.named_parameters():
        param.requires_grad_(not (frozen and name in backbone))
    locked = []
    for name, module in model.named_modules():
        if "train" in vars(module):  # undo an earlier phase's lock
            del module.train
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if (
            frozen
            and not train_bn
            and isinstance(module, _NORM_WITH_STATS)
            and params
            and all(p in backbone for p in params)
        ):
            module.train = types.MethodType(_stay_in_eval, module)
            module.eval()
            locked.append(name)
    return locked
