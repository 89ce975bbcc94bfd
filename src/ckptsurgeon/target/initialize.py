"""Fresh values for re-initialised keys, seeded so the same seed gives the same bytes.

With a model target, only the modules that own the requested keys are materialised (from
the meta device) and initialised the way the model would initialise them: transformers
models through their own ``_init_weights``, other modules through ``reset_parameters``.
Each module gets its own seed derived from its name, so a key's values do not depend on
which other keys are being reset.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.table import TensorRef
from ckptsurgeon.rules.ops import derive_seed

# Modules initialise themselves from torch's global generator, and writers materialise
# tensors on several threads: one module at a time, or the seeded values would interleave.
_GLOBAL_RNG = threading.Lock()


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise FitError(f"target has no module {module_name!r} (for {name!r})") from None
    return module_name, module, attr


def _init_hook(model: nn.Module):
    """How the model initialises one module of its own, or None."""
    init_weights = getattr(model, "_init_weights", None)
    if callable(init_weights) and hasattr(model, "config"):  # a transformers PreTrainedModel
        return init_weights
    return None


def _materialise(
    model: nn.Module, module_name: str, module: nn.Module, seed: int
) -> dict[str, torch.Tensor]:
    fresh = _copy_module(module)
    fresh.to_empty(device="cpu", recurse=False)
    hook = _init_hook(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(derive_seed(seed, module_name))
        if hook is not None:
            hook(fresh)
        elif hasattr(fresh, "reset_parameters"):
            fresh.reset_parameters()
        elif hasattr(fresh, "_reset_parameters"):
            fresh._reset_parameters()
        else:
            raise FitError(
                f"target module {module_name or '(root)'!r} ({type(module).__name__}) has no "
                "reset_parameters(); give the op init: zeros | normal | xavier_uniform | "
                "kaiming_uniform"
            )
    local = dict(fresh.named_parameters(recurse=False))
    local.update(dict(fresh.named_buffers(recurse=False)))
    return {k: v.detach() for k, v in local.items()}


def _copy_module(module: nn.Module) -> nn.Module:
    """A shallow copy owning its own parameter slots (the meta model stays untouched)."""
    import copy

    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {}  # only this module's own tensors are materialised
    return clone


def from_model(model: nn.Module, names: list[str], seed: int) -> dict[str, TensorRef]:
    """Lazy refs to the model's own fresh values for ``names``."""
    by_module: dict[str, list[str]] = {}
    owners: dict[str, nn.Module] = {}
    for name in names:
        module_name, module, _ = _owner(model, name)
        by_module.setdefault(module_name, []).append(name)
        owners[module_name] = module
    refs: dict[str, TensorRef] = {}
    state = model.state_dict(keep_vars=True)
    for module_name, keys in by_module.items():
        cache: dict[str, torch.Tensor] = {}

        def values(mn: str = module_name, c: dict = cache) -> dict[str, torch.Tensor]:
            with _GLOBAL_RNG:
                if not c:
                    c.update(_materialise(model, mn, owners[mn], seed))
            return c

        for key in keys:
            attr = key.rpartition(".")[2]
            meta = state[key]
            refs[key] = TensorRef(
                tuple(meta.shape), meta.dtype, lambda a=attr, v=values: v()[a], None, ()
            )
    return refs


def from_scheme(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, init: str, seed: int
) -> TensorRef:
    """A lazy ref to values drawn from a named scheme (no model to ask)."""

    def load() -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(seed, name))
        t = torch.zeros(shape, dtype=torch.float32)
        if init == "normal":
            t.normal_(0.0, 0.02, generator=gen)
        elif init in ("xavier_uniform", "kaiming_uniform") and len(shape) >= 2:
            fan_out, fan_in = shape[0], math.prod(shape[1:])
            receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
            if init == "xavier_uniform":
                bound = math.sqrt(6.0 / (fan_in + fan_out * receptive))
            else:  # torch's Linear/Conv default: kaiming_uniform_(a=sqrt(5))
                bound = 1.0 / math.sqrt(fan_in)
            t.uniform_(-bound, bound, generator=gen)
        return t.to(dtype)

    return TensorRef(tuple(shape), dtype, load, None, ())
