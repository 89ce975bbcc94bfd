"""Targets: what a result must load into, and where fresh values for it come from.

A model target is built on the meta device (see :mod:`ckptsurgeon.targets.models`), so even
a 7B-parameter model costs no memory; only the modules whose values are re-initialised are
materialised, one at a time.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckptsurgeon.errors import FitError, InputError, UsageError
from ckptsurgeon.formats.table import TensorRef, dtype_name, parse_dtype
from ckptsurgeon.paths import is_hf, resolve
from ckptsurgeon.targets.config import TargetSpec
from ckptsurgeon.targets.initialize import KEEP_FRESH_BYTES
from ckptsurgeon.targets.models import build_meta_model

Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class TargetInfo:
    """Names, shapes and dtypes the result must have, plus a source of fresh values."""

    description: str
    expected: Expected
    model: nn.Module | None = None  # on the meta device
    notes: list[str] = field(default_factory=list)
    # Bytes of fresh values still allowed to wait in memory for the writer, across every
    # op of a run (see ckptsurgeon.targets.initialize).
    fresh_room: int = field(default=KEEP_FRESH_BYTES, repr=False)

    @functools.cached_property
    def tied(self) -> dict[str, tuple[str, ...]]:
        """For each name whose tensor the model shares with other names (tied embeddings),
        every name sharing it, in state-dict order; empty without a model."""
        return tied_names(self.model) if self.model is not None else {}

    def retie(self, model: nn.Module) -> None:
        """Share each tied group's first tensor under all its names again in ``model`` (this
        target's model, or one built alike), as the model's own tying did:
        ``load_state_dict(assign=True)`` gives every name a Parameter of its own."""
        for name, group in self.tied.items():
            if name != group[0]:
                module, _, leaf = name.rpartition(".")
                first, _, first_leaf = group[0].rpartition(".")
                shared = getattr(model.get_submodule(first), first_leaf)
                setattr(model.get_submodule(module), leaf, shared)

    def initial(
        self, names: list[str], seed: int, init: str | None, where: str
    ) -> dict[str, TensorRef]:
        """Fresh, seeded values for ``names``: the model's own initialisation when there is a
        model (and no explicit ``init``), else ``init``."""
        from ckptsurgeon.targets import initialize

        if self.model is not None and init is None:
            refs, kept = initialize.from_model(self.model, names, seed, self.fresh_room)
            self.fresh_room -= kept
            return refs
        if init is None:
            raise FitError(
                f"{where}: the target is a {self.description} with no model to "
                "initialise from; give init: zeros | ones | normal | xavier_uniform | "
                "kaiming_uniform"
            )
        return {n: initialize.from_scheme(n, *self.expected[n], init, seed) for n in names}


def tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """For each state-dict name whose tensor ``model`` shares with other names (tied
    embeddings), every name sharing it, in state-dict order."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            groups.setdefault(id(t), []).append(name)
    return {n: tuple(g) for g in groups.values() if len(g) > 1 for n in g}


def expected_from_model(model: nn.Module) -> Expected:
    """The tensors ``model.load_state_dict(strict=True)`` expects: parameters, persistent
    buffers, and extra state that ``get_extra_state`` returns as a tensor.

    Extra state that is not a tensor has no shape or dtype and is left out here; the strict
    check asks the model for it (see :func:`ckptsurgeon.targets.check.extra_state_names`).
    """
    return {
        name: (tuple(t.shape), t.dtype)
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor)
    }


def expected_from_manifest(path: str) -> Expected:
    """Read an ``inspect --json`` object: {"tensors": {name: {"shape", "dtype"}}}."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        tensors = obj["tensors"]
        return {
            n: (tuple(int(d) for d in t["shape"]), parse_dtype(t["dtype"]))
            for n, t in tensors.items()
        }
    except FileNotFoundError:
        raise UsageError(f"manifest {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"manifest {path}: not an `inspect --json` object ({exc})") from None


def resolve_target(spec: TargetSpec, base_dir: str | None = None) -> TargetInfo:
    """Turn a validated ``target:`` section into a :class:`TargetInfo`."""

    if spec.model:
        model, notes = build_meta_model(spec.model, spec.kwargs, base_dir)
        return TargetInfo(f"model {spec.model}", expected_from_model(model), model, notes)
    if spec.checkpoint:
        from ckptsurgeon.formats.reader import open_checkpoint

        ckpt = open_checkpoint(resolve(spec.checkpoint, base_dir), spec.key, spec.allow_globals)
        return TargetInfo(
            f"checkpoint {spec.checkpoint}",
            {n: (r.shape, r.dtype) for n, r in ckpt.tensors.items()},
        )
    assert spec.manifest
    return TargetInfo(
        f"manifest {spec.manifest}", expected_from_manifest(resolve(spec.manifest, base_dir))
    )


def target_from_cli(
    spec: str, kwargs: Mapping[str, Any] | None = None, allow_globals: Iterable[str] = ()
) -> TargetInfo:
    """``--target SPEC [--kwargs JSON]``: a model spec, a checkpoint, or a manifest file."""
    return resolve_target(target_spec_from_cli(spec, kwargs, allow_globals))


def target_spec_from_cli(
    spec: str, kwargs: Mapping[str, Any] | None = None, allow_globals: Iterable[str] = ()
) -> TargetSpec:
    """The ``target:`` section that ``--target SPEC [--kwargs JSON]`` stands for (``kwargs``
    as the command parsed them); a reference checkpoint admits the command's
    ``--allow-global`` classes too (they name trusted classes, not one file), while its
    container is found on its own (``--key`` is PATH's)."""
    if is_hf(spec):  # a model in the Hugging Face cache: its weights are the reference
        return TargetSpec(checkpoint=spec, allow_globals=list(allow_globals))
    if os.path.exists(os.path.expanduser(spec)):
        if spec.endswith(".json") and not spec.endswith(".index.json"):
            return TargetSpec(manifest=spec)
        return TargetSpec(checkpoint=spec, allow_globals=list(allow_globals))
    if ":" in spec:
        return TargetSpec(model=spec, kwargs=dict(kwargs or {}))
    raise UsageError(f"--target {spec!r}: not a file, and not 'pkg.module:callable'")


def describe(expected: Expected) -> dict[str, dict[str, Any]]:
    return {n: {"shape": list(s), "dtype": dtype_name(d)} for n, (s, d) in expected.items()}
