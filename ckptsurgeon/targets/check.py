"""The strict check: would the result load with ``load_state_dict(strict=True)``?"""

from __future__ import annotations

import re
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase  # where torch's num_batches_tracked rule lives

from ckptsurgeon.formats.table import Table, TensorRef, dtype_name
from ckptsurgeon.targets.spec import TargetInfo


@dataclass
class CheckResult:
    target: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dtype: list[tuple[str, str, str]] = field(default_factory=list)  # informational: load casts
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)
    # Absent, but load_state_dict fills them in itself (BatchNorm's num_batches_tracked).
    filled: list[str] = field(default_factory=list)
    # Absent, but the model ties them to a name the checkpoint has (one Parameter under
    # several names, as tied embeddings are): (absent name, the present partner).
    tied: list[tuple[str, str]] = field(default_factory=list)
    # Names the model ties, present together with different values: the model can hold
    # only one of them.
    tied_conflict: list[tuple[str, ...]] = field(default_factory=list)
    # The target's own loading code raised (a load hook); the load fails however keys match.
    load_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.unexpected or self.shape or self.tied_conflict or self.load_error
        )

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
            "filled_by_load": self.filled,
            "tied": [{"name": n, "tied_to": p} for n, p in self.tied],
            "tied_conflict": [list(names) for names in self.tied_conflict],
            "load_error": self.load_error,
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """A grouped, readable account of every difference."""
        out = []
        if self.load_error:
            out.append(f"load_state_dict fails: {self.load_error}")
        if self.missing:
            out.append(
                f"missing from the checkpoint ({len(self.missing)}): " + group_names(self.missing)
            )
        if self.unexpected:
            out.append(
                f"unexpected by the target ({len(self.unexpected)}): "
                + group_names(self.unexpected)
            )
        for names in self.tied_conflict:
            out.append(
                "tied in the target, different values in the checkpoint: "
                + ", ".join(names)
                + " (the model holds one tensor under these names)"
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
        if self.filled:
            out.append(
                f"filled in by load_state_dict itself ({len(self.filled)}): "
                + group_names(self.filled)
                + " (BatchNorm sets num_batches_tracked to 0 when the state dict carries no "
                "version metadata, as safetensors files, plain dicts and ckptsurgeon's "
                "outputs do)"
            )
        if self.tied:
            out.append(
                f"absent but tied in the target ({len(self.tied)}): "
                + ", ".join(f"{n} (shares {p})" for n, p in self.tied)
                + "; load_state_dict(strict=True) reports them missing, while "
                "from_pretrained or strict=False fills them from the shared tensor"
            )
        if self.allowed_missing or self.allowed_unexpected:
            out.append(
                f"allowed by check: {len(self.allowed_missing)} missing, "
                f"{len(self.allowed_unexpected)} unexpected"
            )
        out.extend(f"note: {note}" for note in self.notes)
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

    The table is judged as a state dict with no version metadata (``_metadata``), which is
    what safetensors files, plain dicts and everything ckptsurgeon writes are; for a model
    target that decides which absent keys torch fills in itself (see :func:`filled_on_load`).
    Those count as filled (``result.filled``, not a failure) when their module has other
    entries in the table, and as missing with the rest of it when it has none.

    Names the model ties (one Parameter under several names: tied embeddings) need only one
    of them in the table: the absent ones count as tied (``result.tied``, not a failure), as
    ``from_pretrained`` sees it. Two or more of one group present must hold the same values
    (``result.tied_conflict`` otherwise); only those groups are read.

    For a model target on the meta device the verdict is also confirmed by
    ``load_state_dict`` itself (free there), which catches models with custom loading hooks.
    """
    miss_res = [re.compile(p) for p in allow_missing]
    unexp_res = [re.compile(p) for p in allow_unexpected]
    result = CheckResult(target.description, notes=list(target.notes))
    model = target.model
    extra = extra_state_names(model) if model is not None else set()
    fills = filled_on_load(model) if model is not None else set()
    expected = target.expected
    tied = target.tied
    present_modules = {n.rpartition(".")[0] for n in table}
    scalars: list[str] = []
    for name in [*expected, *sorted(extra - expected.keys())]:
        if name not in table:
            partner = next((p for p in tied.get(name, ()) if p in table), None)
            # A module absent as a whole is listed whole, so that counts and renames cover
            # all of it; the load fails on its other keys anyway.
            if name in fills and name.rpartition(".")[0] in present_modules:
                result.filled.append(name)
            elif partner is not None:
                result.tied.append((name, partner))
            elif any(r.search(name) for r in miss_res):
                result.allowed_missing.append(name)
            else:
                result.missing.append(name)
            continue
        if name in extra:
            continue  # set_extra_state receives whatever is stored: no shape or dtype to match
        shape, dtype = expected[name]
        ref = table[name]
        if ref.shape != shape:
            if not loads_as_shape(ref.shape, shape):
                result.shape.append((name, ref.shape, shape))
                continue
            scalars.append(name)
        if ref.dtype != dtype:
            result.dtype.append((name, dtype_name(ref.dtype), dtype_name(dtype)))
    for name in table:
        if name not in expected and name not in extra:
            allowed = any(r.search(name) for r in unexp_res)
            (result.allowed_unexpected if allowed else result.unexpected).append(name)
    result.tied_conflict = _tied_conflicts(table, target, {n for n, *_ in result.shape})
    if scalars:
        result.notes.append(
            "shape [1] into a 0-dim target tensor (load_state_dict takes the one element): "
            + group_names(scalars)
        )
    missing_extra = [n for n in result.missing if n in extra]
    if missing_extra:
        result.notes.append(
            f"{group_names(missing_extra)}: non-tensor module state (get_extra_state), which "
            "no tensor file holds; if the module's defaults will do, allow it with "
            "check: {allow_missing: ['_extra_state$']} and load with strict=False"
        )
    if model is not None and result.ok and _on_meta(model):
        _confirm_with_torch(table, model, extra, result)
    return result


def _tied_conflicts(table: Table, target: TargetInfo, misshapen: set[str]) -> list[tuple[str, ...]]:
    """The tied groups of which ``table`` holds two or more names with different values
    (as the target's dtype: ``load_state_dict`` casts each into the one shared tensor, the
    last one written winning). Groups with a shape mismatch are left to the shape check."""
    conflicts: list[tuple[str, ...]] = []
    for group in dict.fromkeys(target.tied.values()):
        present = [n for n in group if n in table]
        if len(present) < 2 or misshapen.intersection(present):
            continue
        first, *others = present
        shape, dtype = target.expected[first]
        value: torch.Tensor | None = None
        for name in others:
            if _same_data(table[first], table[name]):
                continue
            if value is None:
                value = table[first].load().to(dtype).reshape(shape)
            if not _equal(value, table[name].load().to(dtype).reshape(shape)):
                conflicts.append(tuple(present))
                break
    return conflicts


def _same_data(a: TensorRef, b: TensorRef) -> bool:
    """Whether two refs certainly hold the same values without reading them: one loader
    (one ref copied under two names, as fill_missing copies a tied partner), or the same
    bytes of the same file."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.loader is b.loader or (a.span is not None and a.span == b.span)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaNs in the same places counted equal."""
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def loads_as_shape(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether ``load_state_dict`` copies a tensor of shape ``got`` into one of ``want``.

    Equal shapes, or shape ``[1]`` into a 0-dim parameter or buffer: torch keeps that path
    for files from before 0-dim tensors existed (CLIP's ``logit_scale`` is often stored so)
    and loads the single element. A 1-D tensor of any other length is refused.
    """
    return got == want or (want == () and got == (1,))


def filled_on_load(model: nn.Module) -> set[str]:
    """Names that ``model.load_state_dict(strict=True)`` fills in itself when a state dict
    with no version metadata lacks them.

    That is the ``num_batches_tracked`` of every normalisation layer that tracks running
    statistics: BatchNorm's ``_load_from_state_dict`` sets it to 0 for state dicts older
    than its version 2, and a state dict without metadata counts as older.
    """
    return {
        _key(prefix, "num_batches_tracked")
        for prefix, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, _NormBase) and module.track_running_stats
    }


def extra_state_names(model: nn.Module) -> set[str]:
    """The ``_extra_state`` entries ``model.load_state_dict(strict=True)`` requires: one for
    each module whose class overrides ``set_extra_state``, whatever it stores."""
    base = nn.Module.set_extra_state
    return {
        _key(prefix, "_extra_state")  # torch's _EXTRA_STATE_KEY_SUFFIX
        for prefix, module in model.named_modules(remove_duplicate=False)
        if getattr(type(module), "set_extra_state", base) is not base
    }


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _on_meta(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors)


def _confirm_with_torch(
    table: Table, model: nn.Module, extra: set[str], result: CheckResult
) -> None:
    """Load meta stand-ins for ``table`` into the meta ``model`` and merge torch's verdict.

    First with no version metadata, as the check assumes. A model whose own loading code
    refuses that (torchvision's MNASNet requires a version) is tried again with the
    metadata ``torch.save(model.state_dict())`` records; if that loads, the result holds,
    with a note on what the load needs. Extra state is left out: it was judged by name, and
    the model's ``set_extra_state`` must not receive stand-ins.
    """
    metas = OrderedDict(
        (n, torch.empty(r.shape, dtype=r.dtype, device="meta"))
        for n, r in table.items()
        if n not in extra
    )
    try:
        incompatible = _load_on_meta(model, metas)
    except Exception as plain_error:
        refusal = _describe_refusal(plain_error)
        metas._metadata = _version_metadata(model)  # type: ignore[attr-defined]
        try:
            incompatible = _load_on_meta(model, metas)
        except Exception:
            result.load_error = refusal
            return
        result.notes.append(
            f"without version metadata in the state dict, {refusal}. torch.save("
            "model.state_dict()) records that metadata; safetensors files, plain dicts and "
            "ckptsurgeon's outputs carry none: before model.load_state_dict(sd), add it with "
            "sd = collections.OrderedDict(sd); sd._metadata = model.state_dict()._metadata"
        )
    tied = {name for name, _ in result.tied}
    for name in incompatible.missing_keys:
        if name in extra or name in tied:
            continue
        if name in result.filled:  # torch did not fill it after all: the metadata says v2
            result.filled.remove(name)
            result.missing.append(name)
        elif name not in result.allowed_missing and name not in result.missing:
            result.missing.append(name)
    for name in incompatible.unexpected_keys:
        if name not in result.allowed_unexpected and name not in result.unexpected:
            result.unexpected.append(name)


def _load_on_meta(model: nn.Module, metas: OrderedDict[str, torch.Tensor]) -> Any:
    # Warnings from this stand-in load (BatchNorm copying a CPU zero into a meta buffer,
    # say) describe the rehearsal, not the user's load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.load_state_dict(metas, strict=False)


def _version_metadata(model: nn.Module) -> Any:
    """The ``_metadata`` that ``torch.save(model.state_dict())`` would record."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(model.state_dict(keep_vars=True), "_metadata", None)


def _describe_refusal(exc: BaseException) -> str:
    """``exc`` in one line, naming the module whose ``_load_from_state_dict`` raised it."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(message) > 300:
        message = message[:300] + " ..."
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        module = frame.f_locals.get("self")
        if frame.f_code.co_name == "_load_from_state_dict" and isinstance(module, nn.Module):
            prefix = str(frame.f_locals.get("prefix", "")).rstrip(".")
            where = f"module {prefix!r}" if prefix else "the root module"
            return f"{type(module).__name__} ({where}) raised {text}"
    return f"load_state_dict raised {text}"
