"""Targets: what a result must load into, and where fresh values for it come from.

A model target is built on the meta device, so even a 7B-parameter model costs no memory;
only the modules whose values are re-initialised are materialised, one at a time.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckptsurgeon.errors import FitError, InputError, UsageError
from ckptsurgeon.formats.table import TensorRef, dtype_name, parse_dtype
from ckptsurgeon.rules.config import TargetSpec

Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class TargetInfo:
    """Names, shapes and dtypes the result must have, plus a source of fresh values."""

    description: str
    expected: Expected
    model: nn.Module | None = None  # on the meta device
    notes: list[str] = field(default_factory=list)

    def initial(
        self, names: list[str], seed: int, init: str | None, where: str
    ) -> dict[str, TensorRef]:
        """Fresh, seeded values for ``names``: the model's own initialisation when there is a
        model (and no explicit ``init``), else ``init``."""
        from ckptsurgeon.target import initialize

        if self.model is not None and init is None:
            return initialize.from_model(self.model, names, seed)
        if init is None:
            raise FitError(
                f"{where}: the target is a {self.description} with no model to "
                "initialise from; give init: zeros | normal | xavier_uniform | "
                "kaiming_uniform"
            )
        return {n: initialize.from_scheme(n, *self.expected[n], init, seed) for n in names}


def load_callable(spec: str, base_dir: str | None = None) -> Callable[..., Any]:
    """Resolve ``"pkg.module:callable"`` or ``"path/to/file.py:callable"``.

    Relative file paths resolve against ``base_dir`` (the rules file's folder).
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(f"target {spec!r}: expected 'pkg.module:callable' or 'file.py:callable'")
    if module_part.endswith(".py"):
        path = (
            module_part
            if os.path.isabs(module_part)
            else os.path.join(base_dir or ".", module_part)
        )
        if not os.path.isfile(path):
            raise UsageError(f"target {spec!r}: no file {path}")
        name = f"ckptsurgeon_user_{abs(hash(os.path.abspath(path)))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec and module_spec.loader
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise UsageError(f"target {spec!r}: importing {path} failed: {exc}") from None
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise UsageError(f"target {spec!r}: cannot import {module_part}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"target {spec!r}: {module_part} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"target {spec!r}: {attr} is not callable")
    return obj


def build_model(
    spec: str, kwargs: dict[str, Any], base_dir: str | None = None, device: str = "meta"
) -> nn.Module:
    """Construct the target model (on the meta device by default).

    A transformers model class is built from its config class: ``kwargs`` are the config's
    fields, as in ``BertForSequenceClassification(BertConfig(**kwargs))``.
    """
    factory = load_callable(spec, base_dir)
    config_class = getattr(factory, "config_class", None)
    try:
        with torch.device(device):
            if isinstance(factory, type) and config_class is not None:
                model = factory(config_class(**kwargs))
            else:
                model = factory(**kwargs)
    except Exception as exc:
        raise UsageError(
            f"target {spec!r}: constructing it failed: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"target {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def expected_from_model(model: nn.Module) -> Expected:
    """What ``model.load_state_dict(strict=True)`` expects: parameters and persistent buffers."""
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict(keep_vars=True).items()}


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

    def rel(p: str) -> str:
        return p if os.path.isabs(p) or base_dir is None else os.path.join(base_dir, p)

    if spec.model:
        model = build_model(spec.model, spec.kwargs, base_dir)
        return TargetInfo(f"model {spec.model}", expected_from_model(model), model)
    if spec.checkpoint:
        from ckptsurgeon.formats.reader import open_checkpoint

        ckpt = open_checkpoint(rel(spec.checkpoint), spec.key)
        return TargetInfo(
            f"checkpoint {spec.checkpoint}",
            {n: (r.shape, r.dtype) for n, r in ckpt.tensors.items()},
        )
    assert spec.manifest
    return TargetInfo(f"manifest {spec.manifest}", expected_from_manifest(rel(spec.manifest)))


def target_from_cli(spec: str, kwargs_json: str | None, key: str | None = None) -> TargetInfo:
    """``--target SPEC [--kwargs JSON]``: a model spec, a checkpoint, or a manifest file."""
    return resolve_target(target_spec_from_cli(spec, kwargs_json, key))


def target_spec_from_cli(spec: str, kwargs_json: str | None, key: str | None = None) -> TargetSpec:
    """The ``target:`` section that ``--target SPEC [--kwargs JSON]`` stands for."""
    kwargs: dict[str, Any] = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--kwargs: not JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise UsageError("--kwargs: must be a JSON object")
    if os.path.exists(spec):
        if spec.endswith(".json") and not spec.endswith(".index.json"):
            return TargetSpec(manifest=spec)
        return TargetSpec(checkpoint=spec, key=key)
    if ":" in spec:
        return TargetSpec(model=spec, kwargs=kwargs)
    raise UsageError(f"--target {spec!r}: not a file, and not 'pkg.module:callable'")


def describe(expected: Expected) -> dict[str, dict[str, Any]]:
    return {n: {"shape": list(s), "dtype": dtype_name(d)} for n, (s, d) in expected.items()}
