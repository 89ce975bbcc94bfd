"""Building a target's model from ``pkg.module:callable`` or ``file.py:callable``.

A model target is built on the meta device, so even a 7B-parameter model costs no memory
(one whose constructor cannot run there is built on the CPU and then moved to it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ckptsurgeon.errors import UsageError
from ckptsurgeon.paths import resolve


def load_callable(spec: str, base_dir: str | None = None) -> Callable[..., Any]:
    """Resolve ``"pkg.module:callable"`` or ``"path/to/file.py:callable"``.

    A file path may start with ``~``; a relative one resolves against ``base_dir`` (the
    rules file's folder), or the working directory when there is none.
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(f"target {spec!r}: expected 'pkg.module:callable' or 'file.py:callable'")
    if module_part.endswith(".py"):
        path = resolve(module_part, base_dir)
        if not os.path.isfile(path):
            raise UsageError(f"target {spec!r}: no file {path}")
        # Stable across processes (hash() is salted per process): DataLoader workers
        # started with spawn or forkserver import the file again under this name.
        digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
        name = f"ckptsurgeon_user_{digest}"
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
    """Construct the target model on ``device`` (the meta device by default).

    A transformers model class is built from its config class: ``kwargs`` are the config's
    fields, as in ``BertForSequenceClassification(BertConfig(**kwargs))``. For the meta
    device, a model that cannot be built there is built on the CPU and moved to it (see
    :func:`build_meta_model`).
    """
    if device == "meta":
        return build_meta_model(spec, kwargs, base_dir)[0]
    factory = load_callable(spec, base_dir)
    try:
        model = _construct(factory, kwargs, device)
    except Exception as exc:
        raise UsageError(f"target {spec!r}: constructing it failed: {_describe(exc)}") from None
    return _checked_module(spec, model)


def build_meta_model(
    spec: str, kwargs: dict[str, Any], base_dir: str | None = None
) -> tuple[nn.Module, list[str]]:
    """The target model on the meta device, and notes on how it got there.

    Building on the meta device costs no memory, but some constructors read values back
    from tensors they create (torchvision's ``regnet_*``). Those are built on the CPU
    instead, which costs the model's full size while it is built, then moved to the meta
    device; the returned note says so. Raises UsageError when both ways fail.
    """
    factory = load_callable(spec, base_dir)
    try:
        return _checked_module(spec, _construct(factory, kwargs, "meta")), []
    except UsageError:
        raise  # built, but not a module: the CPU would give the same
    except Exception as exc:
        meta_error = _describe(exc)
    try:
        model = _checked_module(spec, _construct(factory, kwargs, "cpu"))
    except UsageError:
        raise
    except Exception as exc:
        cpu_error = _describe(exc)
        where = (
            meta_error
            if cpu_error == meta_error
            else f"on the meta device: {meta_error}; on the CPU: {cpu_error}"
        )
        raise UsageError(f"target {spec!r}: constructing it failed: {where}") from None
    model.to("meta")  # frees the CPU copy: the target only ever needs shapes and dtypes
    note = (
        f"target {spec!r} cannot be built on the meta device ({meta_error}); it was built "
        "on the CPU instead, which takes the model's full size in memory while it is built"
    )
    return model, [note]


def _construct(factory: Callable[..., Any], kwargs: dict[str, Any], device: str) -> Any:
    """Call ``factory`` with ``kwargs``, creating its tensors on ``device``."""
    config_class = getattr(factory, "config_class", None)
    with torch.device(device):
        if isinstance(factory, type) and config_class is not None:
            return factory(config_class(**kwargs))
        return factory(**kwargs)


def _checked_module(spec: str, model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise UsageError(f"target {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
