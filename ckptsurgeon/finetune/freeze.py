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


def under(name: str, prefix: str) -> bool:
    """Whether parameter or module ``name`` is ``prefix`` or lies inside it."""
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
        if any(under(n, p) for p in prefixes) or any(r.search(n) for r in patterns)
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
            found = {n for n in names if under(n, selector)}
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


# An indexed container (ModuleList/Sequential) is the model's block stack when it has at
# least this many entries and holds at least half the parameters (transformer layers).
MIN_STACK = 4


def main_stack(model: nn.Module) -> list[str] | None:
    """The entries (module paths) of the model's main stack, as :func:`block_of` defines
    it, or None when it has none."""
    total = sum(p.numel() for p in model.parameters())
    stacks = [
        (sum(p.numel() for p in m.parameters()), name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= MIN_STACK
    ]
    big = max(stacks, key=lambda s: s[0], default=None)
    if big is None or 2 * big[0] < total:
        return None
    _, stack, module = big
    return [f"{stack}.{c}" if stack else c for c, _ in module.named_children()]


def block_of(model: nn.Module) -> dict[str, int]:
    """Each parameter's block, counted from the input, for layer-wise LR decay.

    The blocks are the entries of the model's main stack, an ``nn.ModuleList`` or
    ``nn.Sequential`` with at least four entries holding at least half the parameters
    (a transformer's layers): what comes before it is block 0 (embeddings), entry ``i`` is
    block ``i + 1``, what comes after it is the last block (final norm, pooler, head).
    Without such a stack, the blocks are the model's top-level children in order (a
    ResNet: conv1, bn1, layer1 ... layer4, fc); parameters of the model itself join the
    block of the child that follows them."""
    params = dict(model.named_parameters())
    entries = main_stack(model)
    if entries is not None:
        out, after = {}, False
        for name in params:
            inside = next((i for i, e in enumerate(entries) if under(name, e)), None)
            if inside is not None:
                out[name], after = inside + 1, True
            else:
                out[name] = len(entries) + 1 if after else 0
        return out
    children = [c for c, m in model.named_children() if any(True for _ in m.parameters())]
    out = {}
    for name in params:
        found = next((i for i, c in enumerate(children) if under(name, c)), None)
        out[name] = found if found is not None else 0
    return out


def blocks_from_head(model: nn.Module) -> dict[str, int]:
    """For each parameter, how many blocks lie between its block and the last one (0 for
    the last block): the power of ``layer_decay`` its learning rate gets."""
    blocks = block_of(model)
    last = max(blocks.values(), default=0)
    return {name: last - block for name, block in blocks.items()}
