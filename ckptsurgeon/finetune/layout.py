"""The model as the ``strategy:`` presets see it, and the decision table's four cases.

Shared by :mod:`ckptsurgeon.finetune.strategy` (which expands a preset into freeze +
phases) and :mod:`ckptsurgeon.finetune.probe` (which measures which case ``auto`` is in);
both import it, it imports neither, so the package's imports flow one way.

The *head* is what ``freeze.except`` matches, else the model's last top-level child holding
parameters (``fc``, ``classifier``, ``head``); the *backbone* is everything else, cut into
*blocks* from the input: the entries of the model's main stack
(:func:`~ckptsurgeon.finetune.freeze.main_stack`: a transformer's layers, a CNN's
``features``), with what lies before and after the stack as blocks of their own, or,
without a stack, the top-level children (a ResNet: conv1, bn1, layer1 ... layer4). A block
is named by its module path (``^name$`` for a parameter of the model itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ckptsurgeon.errors import UsageError
from ckptsurgeon.finetune.freeze import main_stack, under
from ckptsurgeon.rules.finetune import FreezeSpec

# The decision table: (examples per class, domain) -> the strategy for that case.
CASES = {
    ("little", "similar"): "head_only",
    ("little", "different"): "partial",
    ("much", "similar"): "full",
    ("much", "different"): "scratch",
}


@dataclass
class Layout:
    """The model as the strategies see it: the head and the backbone's blocks in order."""

    head: list[str]  # regexes over parameter names
    blocks: list[str]  # module paths, or ^name$ for a parameter of the model itself
    head_default: bool = True  # the head was found, not named by freeze.except

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "blocks": self.blocks}


def _stack_ancestor(prefix: str, stack: str | None) -> bool:
    return stack is not None and (stack == prefix or stack.startswith(prefix + "."))


def _block_selector(model: nn.Module, name: str, entries: list[str], stack: str | None) -> str:
    """The block a parameter is in: its stack entry, else the largest module holding it
    that does not also hold the stack, else the parameter itself."""
    for entry in entries:
        if under(name, entry):
            return entry
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if not _stack_ancestor(prefix, stack):
            return prefix
    return f"^{re.escape(name)}$"


def layout(model: nn.Module, freeze: FreezeSpec) -> Layout:
    """Find the head and the backbone's blocks (see the module docstring)."""
    names = [n for n, _ in model.named_parameters()]
    if freeze.except_:
        head = list(freeze.except_)
        head_default = False
    else:
        owners = [c for c, m in model.named_children() if any(True for _ in m.parameters())]
        if not owners:
            raise UsageError("strategy: the model has no child module holding parameters")
        head = [f"^{re.escape(owners[-1])}\\."]
        head_default = True
    in_head = [re.compile(h) for h in head]
    entries = main_stack(model) or []
    stack = entries[0].rpartition(".")[0] if entries else None
    blocks: list[str] = []
    for name in names:
        if any(r.search(name) for r in in_head):
            continue
        block = _block_selector(model, name, entries, stack)
        if block not in blocks:
            blocks.append(block)
    return Layout(head=head, blocks=blocks, head_default=head_default)


def default_depth(blocks: int) -> int:
    """partial's frozen blocks when neither the file nor ``auto`` chose: the lower half."""
    return blocks // 2
