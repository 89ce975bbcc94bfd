"""The strict check: would the result load with ``load_state_dict(strict=True)``?"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptsurgeon.formats.table import Table, dtype_name
from ckptsurgeon.target.spec import TargetInfo


@dataclass
class CheckResult:
    target: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dtype: list[tuple[str, str, str]] = field(default_factory=list)  # informational: load casts
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "shape_mismatch": [
                {"name": n, "checkpoint": list(a), "target": list(b)} for n, a, b in self.shape
            ],
            "dtype_mismatch": [{"name": n, "checkpoint": a, "target": b} for n, a, b in self.dtype],
            "allowed_missing": self.allowed_missing,
            "allowed_unexpected": self.allowed_unexpected,
        }

    def lines(self) -> list[str]:
        """A grouped, readable account of every difference."""
        out = []
        if self.missing:
            out.append(
                f"missing from the checkpoint ({len(self.missing)}): " + group_names(self.missing)
            )
        if self.unexpected:
            out.append(
                f"unexpected by the target ({len(self.unexpected)}): "
                + group_names(self.unexpected)
            )
        for name, got, want in self.shape[:20]:
            out.append(f"shape mismatch: {name}: checkpoint {list(got)}, target {list(want)}")
        if len(self.shape) > 20:
            out.append(f"... and {len(self.shape) - 20} more shape mismatches")
        if self.dtype:
            pairs = sorted({(a, b) for _, a, b in self.dtype})
            out.append(
                f"dtype differs for {len(self.dtype)} keys ("
                + ", ".join(f"{a} -> {b}" for a, b in pairs)
                + "); load_state_dict casts them"
            )
        if self.allowed_missing or self.allowed_unexpected:
            out.append(
                f"allowed by check: {len(self.allowed_missing)} missing, "
                f"{len(self.allowed_unexpected)} unexpected"
            )
        return out


def group_names(names: Iterable[str], limit: int = 8) -> str:
    """``fc.weight, fc.bias, head.x`` -> ``fc.{weight,bias}, head.x``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        groups.setdefault(module, []).append(leaf)
    parts = [
        (f"{m}.{{{','.join(leaves)}}}" if len(leaves) > 1 else f"{m}.{leaves[0]}")
        if m
        else ", ".join(leaves)
        for m, leaves in groups.items()
    ]
    shown = ", ".join(parts[:limit])
    return shown + (f", ... ({len(parts) - limit} more modules)" if len(parts) > limit else "")


def check_table(
    table: Table,
    target: TargetInfo,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> CheckResult:
    """Compare ``table`` with the target with strict-load semantics.

    For a model target the verdict is also confirmed by ``load_state_dict`` itself on the
    meta device (free), which catches models with custom loading hooks.
    """
    miss_res = [re.compile(p) for p in allow_missing]
    unexp_res = [re.compile(p) for p in allow_unexpected]
    result = CheckResult(target.description)
    expected = target.expected
    for name, (shape, dtype) in expected.items():
        if name not in table:
            bucket = (
                result.allowed_missing if any(r.search(name) for r in miss_res) else result.missing
            )
            bucket.append(name)
            continue
        ref = table[name]
        if ref.shape != shape:
            result.shape.append((name, ref.shape, shape))
        elif ref.dtype != dtype:
            result.dtype.append((name, dtype_name(ref.dtype), dtype_name(dtype)))
    for name in table:
        if name not in expected:
            allowed = any(r.search(name) for r in unexp_res)
            (result.allowed_unexpected if allowed else result.unexpected).append(name)
    if target.model is not None and result.ok and _on_meta(target.model):
        _confirm_with_torch(table, target, result)
    return result


def _on_meta(model: torch.nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors)


def _confirm_with_torch(table: Table, target: TargetInfo, result: CheckResult) -> None:
    assert target.model is not None
    metas = {n: torch.empty(r.shape, dtype=r.dtype, device="meta") for n, r in table.items()}
    try:
        incompatible = target.model.load_state_dict(metas, strict=False)
    except RuntimeError as exc:
        result.unexpected.append(f"<load_state_dict refused: {str(exc).splitlines()[0]}>")
        return
    for name in incompatible.missing_keys:
        if name not in result.allowed_missing and name not in result.missing:
            result.missing.append(name)
    for name in incompatible.unexpected_keys:
        if name not in result.allowed_unexpected and name not in result.unexpected:
            result.unexpected.append(name)
