"""Fresh values for re-initialised keys, seeded so the same seed gives the same bytes.

With a model target, a key's values are what building the model would give it, replayed for
the module that owns the key (its *owner*) instead of for the whole model:

* The owner and everything below it are materialised on the CPU and filled with NaN (integer
  tensors with a sentinel); its descendants stay on the meta device instead when together
  they would take more than 256 MiB. Every module above the owner, up to the root, takes
  part as a stand-in whose other children are meta tensors, so nothing beside the owner's
  subtree is ever materialised, and the target model itself is never touched.
* The materialised modules are initialised children first (as construction runs), then each
  module above the owner, nearest first. Initialising a module means its own
  ``reset_parameters()`` (or ``_reset_parameters()``), which is what its constructor ran,
  then, inside a transformers model, ``_init_weights(module)`` of the nearest enclosing
  ``PreTrainedModel``, which is what ``post_init()`` -> ``initialize_weights()`` runs (its
  ``smart_apply`` walks the tree children first and dispatches each sub-model's own
  ``_init_weights``). Running the modules above the owner is what gives GPT-2's ``c_proj``
  its ``initializer_range / sqrt(2 * n_layer)`` and ``MultiheadAttention``'s ``out_proj.bias``
  its zeros.
* Not replayed: code in a constructor's own body (torchvision's ResNet re-draws its convs
  there), ``_init_weights`` calls on modules beside the path from the root to the owner (they
  would have to reach across the tree), the tying of weights (a tied key gets values of its
  own), and transformers' ``_is_hf_initialized`` flags (nothing is loaded, so none is set).
  Values follow the same distributions, not the same bytes as one model construction, since
  the random stream is seeded per owner.

A requested value the initialisation leaves unset (still NaN, or for an integer tensor,
different between runs with different sentinels) is refused with a FitError asking for the
op's ``init:``, as is a module nothing would initialise, and an init that fails on the
partial model (one that reads values it would find on the meta device). Values are made at
planning time, so a dry run fails exactly where the real run would; large ones are dropped and
made again (the same bytes) when the writer asks for them, one module at a time.

Each owner gets its own seed derived from its name, so a key's values do not depend on which
other keys are being reset.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable

import torch
from torch import nn

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.table import TensorRef
from ckptsurgeon.targets.seeds import derive_seed

# Modules initialise themselves from torch's global generator, and writers materialise
# tensors on several threads: one module at a time, or the seeded values would interleave.
_GLOBAL_RNG = threading.Lock()

# Descendants are materialised only so that an owner's init which reaches into its children
# (MultiheadAttention, CLIP's embeddings) runs on real tensors; past this size (the owner is
# the root, say) they stay on the meta device, where in-place init is a no-op.
_DESCENDANT_BYTES = 256 << 20

# Fresh values are kept from planning until they are written up to this much per run (see
# TargetInfo.initial); the rest
# are made again at write time, so memory holds one module's values, not every module's.
KEEP_FRESH_BYTES = 256 << 20

_GIVE_INIT = "give the op init: zeros | ones | normal | xavier_uniform | kaiming_uniform"

Make = Callable[[torch.Tensor], torch.Tensor]


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise FitError(f"target has no module {module_name!r} (for {name!r})") from None
    return module_name, module, attr


def _pretrained_class() -> type | None:
    """transformers' ``PreTrainedModel``, if transformers is loaded (a model of it would be)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return getattr(modeling_utils, "PreTrainedModel", None)


def _reset(module: nn.Module) -> Callable[[], object] | None:
    """The module's own re-initialisation (what its constructor ran), or None."""
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta


def _blank(sentinel: int) -> Make:
    """Makes CPU tensors filled with NaN, or for integer tensors with their ``sentinel``-th
    extreme (0: the minimum, 1: the maximum), so that values no init writes can be told."""

    def make(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        if out.is_floating_point() or out.is_complex():
            out.fill_(math.nan)
        elif out.dtype == torch.bool:
            out.fill_(bool(sentinel))
        else:
            info = torch.iinfo(out.dtype)
            out.fill_(info.max if sentinel else info.min)
        return nn.Parameter(out, t.requires_grad) if isinstance(t, nn.Parameter) else out

    return make


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module sharing ``module``'s attributes; not ``copy.copy``, which parametrized
    modules refuse (their ``__getstate__`` raises)."""
    clone = type(module).__new__(type(module))
    clone.__dict__.update(module.__dict__)
    return clone


def _clone(module: nn.Module, make: Make, make_below: Make, memo: dict[int, object]) -> nn.Module:
    """A copy of ``module``'s tree with its own slots: its tensors made by ``make``, its
    descendants' by ``make_below``; ``memo`` keeps shared modules and tied tensors shared."""
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[return-value]
    clone = _shallow_copy(module)
    memo[id(module)] = clone

    def made(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in memo:
            memo[id(t)] = make(t)
        return memo[id(t)]  # type: ignore[return-value]

    clone._parameters = {n: made(p) for n, p in module._parameters.items()}
    clone._buffers = {n: made(b) for n, b in module._buffers.items()}
    clone._modules = {
        n: None if c is None else _clone(c, make_below, make_below, memo)
        for n, c in module._modules.items()
    }
    return clone


def _skeleton(model: nn.Module) -> nn.Module:
    """The model's tree with meta tensors of its own: what the owners' stand-in parents hold,
    so that no init can write into the target model (``load_into`` passes a real one)."""
    return _clone(model, _to_meta, _to_meta, {})


def _descendant_bytes(module: nn.Module) -> int:
    own = {id(t) for t in (*module._parameters.values(), *module._buffers.values())}
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers()) if id(t) not in own}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _Replay:
    """The path from the root to one owner in a skeleton, and how to replay the owner's
    initialisation on a materialised copy of its subtree."""

    def __init__(self, skeleton: nn.Module, module_name: str) -> None:
        self.module_name = module_name
        self.names = module_name.split(".") if module_name else []
        self.path = [skeleton]
        for name in self.names:
            self.path.append(self.path[-1]._modules[name])  # type: ignore[arg-type]
        self.pretrained = _pretrained_class()
        self.descend = _descendant_bytes(self.owner) <= _DESCENDANT_BYTES

    @property
    def owner(self) -> nn.Module:
        return self.path[-1]

    def anything_initialises(self) -> bool:
        """Whether any init could write the owner's own tensors (its descendants' cannot)."""
        return any(self._is_pretrained(m) or _reset(m) is not None for m in self.path)

    def run(self, sentinel: int, seed: int) -> dict[str, torch.Tensor]:
        """Materialise the owner's subtree, initialise it and the stand-ins above it, and
        return the owner's own tensors."""
        blank = _blank(sentinel)
        owner = _clone(self.owner, blank, blank if self.descend else _to_meta, {})
        stand_ins = self._stand_ins(owner)
        governors: list[nn.Module | None] = []
        for module in stand_ins:  # the nearest PreTrainedModel at or above each
            governors.append(module if self._is_pretrained(module) else (governors or [None])[-1])
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(derive_seed(seed, self.module_name))
            if self.descend:
                seen = {id(owner)}
                for child in owner.children():
                    self._initialise_tree(child, governors[-1], seen)
            for module, governor in zip(reversed(stand_ins), reversed(governors), strict=True):
                _initialise(module, governor)
        own = {**owner._parameters, **owner._buffers}
        return {n: t.detach() for n, t in own.items() if t is not None}

    def _is_pretrained(self, module: nn.Module) -> bool:
        return self.pretrained is not None and isinstance(module, self.pretrained)

    def _initialise_tree(
        self, module: nn.Module, governor: nn.Module | None, seen: set[int]
    ) -> None:
        """Children first, as construction and transformers' ``smart_apply`` go; a sub-model
        brings its own ``_init_weights``."""
        if id(module) in seen:
            return
        seen.add(id(module))
        if self._is_pretrained(module):
            governor = module
        for child in module.children():
            self._initialise_tree(child, governor, seen)
        _initialise(module, governor)

    def _stand_ins(self, owner: nn.Module) -> list[nn.Module]:
        """Copies of the modules from the root down to the owner, each holding the next."""
        stand_ins = [owner]
        for depth in range(len(self.path) - 2, -1, -1):
            parent = _shallow_copy(self.path[depth])
            parent._parameters = dict(parent._parameters)
            parent._buffers = dict(parent._buffers)
            parent._modules = {**parent._modules, self.names[depth]: stand_ins[0]}
            stand_ins.insert(0, parent)
        return stand_ins


def _initialise(module: nn.Module, governor: nn.Module | None) -> None:
    """What construction does to one module: its own reset, then transformers' init."""
    reset = _reset(module)
    if reset is not None:
        reset()
    if governor is not None:
        governor._init_weights(module)  # type: ignore[operator]


def _unset(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether some element of a requested tensor was left as the blank filled it."""
    if first.is_floating_point() or first.is_complex():
        return bool(torch.isnan(first).any())
    return not torch.equal(first, second)


def _fresh_values(
    skeleton: nn.Module, module_name: str, keys: dict[str, str], seed: int
) -> dict[str, torch.Tensor]:
    """The owner ``module_name``'s fresh values for ``keys`` (state-dict name -> attribute),
    by attribute; FitError when the model's own initialisation cannot make all of them."""
    replay = _Replay(skeleton, module_name)
    owner_text = f"{module_name or '(root)'!r} ({type(replay.owner).__name__})"
    names = ", ".join(repr(k) for k in keys)
    own = {**replay.owner._parameters, **replay.owner._buffers}
    for key, attr in keys.items():
        if own.get(attr) is None:
            raise FitError(
                f"cannot make fresh values for {key!r}: it is not a parameter or buffer of "
                f"target module {owner_text}; {_GIVE_INIT}"
            )
    if not replay.anything_initialises():
        raise FitError(
            f"cannot make fresh values for {names}: target module {owner_text} and the "
            f"modules above it have no reset_parameters(), and it is not in a transformers "
            f"model; {_GIVE_INIT}"
        )
    wanted = set(keys.values())
    try:
        first = replay.run(0, seed)
        # Integers cannot hold NaN: what no init writes differs between two sentinels.
        all_float = all(first[a].is_floating_point() or first[a].is_complex() for a in wanted)
        second = first if all_float else replay.run(1, seed)
    except FitError:
        raise
    except Exception as exc:  # the target's own init code, run on a partial model
        raise FitError(
            f"cannot make fresh values for {names}: initialising target module {owner_text} "
            f"failed ({type(exc).__name__}: {exc}); {_GIVE_INIT}"
        ) from None
    unset = [k for k, a in keys.items() if _unset(first[a], second[a])]
    if unset:
        raise FitError(
            f"cannot make fresh values for {', '.join(map(repr, unset))}: the target model's "
            f"initialisation of {owner_text} leaves them unset; {_GIVE_INIT}"
        )
    return {a: first[a] for a in wanted}


class _OwnerValues:
    """One owner's fresh values, made (and so checked) at planning time. Small ones are kept
    until written; large ones are made again, one owner at a time, when the writer asks (the
    seed fixes the bytes), so memory does not hold every owner's values at once."""

    def __init__(
        self, skeleton: nn.Module, module_name: str, keys: dict[str, str], seed: int, room: int
    ) -> None:
        """``room``: how many more bytes of fresh values may be kept in memory."""
        self._args = (skeleton, module_name, keys, seed)
        self._lock = threading.Lock()
        values = _fresh_values(*self._args)
        self.planned = {a: (tuple(t.shape), t.dtype) for a, t in values.items()}
        self.nbytes = sum(t.numel() * t.element_size() for t in values.values())
        self._keep = self.nbytes <= room
        self._values = values if self._keep else {}

    @property
    def kept(self) -> int:
        """Bytes this owner keeps in memory until they are written."""
        return self.nbytes if self._keep else 0

    def get(self, attr: str) -> torch.Tensor:
        with self._lock:
            if self._keep:
                return self._values[attr]
            if attr not in self._values:
                self._values = _fresh_values(*self._args)
            return self._values.pop(attr)


def from_model(
    model: nn.Module, names: list[str], seed: int, room: int = KEEP_FRESH_BYTES
) -> tuple[dict[str, TensorRef], int]:
    """Refs to the model's own fresh values for ``names``, made and checked now: FitError
    when its initialisation cannot make one of them. At most ``room`` bytes of them are kept
    in memory until written; returns the refs and the bytes kept."""
    by_module: dict[str, dict[str, str]] = {}
    for name in names:
        module_name, _, attr = _owner(model, name)
        by_module.setdefault(module_name, {})[name] = attr
    skeleton = _skeleton(model)
    refs: dict[str, TensorRef] = {}
    kept = 0
    for module_name, keys in by_module.items():
        owner = _OwnerValues(skeleton, module_name, keys, seed, room - kept)
        kept += owner.kept
        for key, attr in keys.items():
            shape, dtype = owner.planned[attr]
            refs[key] = TensorRef(shape, dtype, lambda a=attr, o=owner: o.get(a), None, ())
    return refs, kept


def from_scheme(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, init: str, seed: int
) -> TensorRef:
    """A lazy ref to values drawn from a named scheme (no model to ask)."""

    def load() -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(seed, name))
        t = torch.zeros(shape, dtype=torch.float32)
        if init == "ones":  # norm scales, running variances
            t.fill_(1.0)
        elif init == "normal":
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
