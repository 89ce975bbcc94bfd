"""The lazy tensor table every reader produces and every writer consumes.

A :class:`TensorRef` describes one tensor without holding its data: shape, dtype, how to
materialise it and, when the bytes sit unchanged in a file, exactly where. Rules derive new
refs from old ones (a cast, a transpose, a split) by composing functions, so planning a whole
surgery reads no tensor data, and writers can copy untouched bytes straight from disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from ckptsurgeon.formats.actions import Action
from ckptsurgeon.formats.dtypes import canonical_dtype, dtype_name
from ckptsurgeon.formats.spans import ByteSpan, CastSpan


@dataclass(frozen=True)
class TensorRef:
    """A tensor that can be materialised on demand.

    ``sources`` are the original checkpoint keys this tensor comes from; ``actions`` is the
    history of what the rules did to it, in order, for reports.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    span: ByteSpan | None = None
    sources: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()
    cast_from: CastSpan | None = None
    # How the rules computed this tensor from others, so that the same steps can run on
    # other values (verification runs them on element indices: see :func:`replay`).
    lineage: Lineage | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_itemsize(self.dtype)

    def load(self) -> torch.Tensor:
        """Materialise the tensor on the CPU, checking it matches the promised shape/dtype."""
        tensor = self.loader()
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise RuntimeError(
                f"tensor from {self.sources} materialised as {tuple(tensor.shape)} "
                f"{tensor.dtype}, planned {self.shape} {self.dtype}"
            )
        return tensor

    def with_action(self, action: Action) -> TensorRef:
        """The same tensor with one more entry in its history (a rename, say)."""
        return replace(self, actions=(*self.actions, action))

    def derive(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        action: Action,
        *,
        keeps_bytes: bool = False,
    ) -> TensorRef:
        """A new ref whose value is ``fn(self.load())``.

        The new shape and dtype come from running ``fn`` on a meta tensor, so a bad
        transform (a reshape to the wrong numel, say) fails at planning time, before any
        data is read. ``keeps_bytes`` marks transforms that leave the row-major bytes
        unchanged (a reshape), which lets writers keep copying straight from disk.
        """
        meta = fn(torch.empty(self.shape, dtype=self.dtype, device="meta"))
        parent = self
        same_bytes = keeps_bytes and meta.dtype == self.dtype
        return TensorRef(
            shape=tuple(meta.shape),
            dtype=meta.dtype,
            loader=lambda: fn(parent.load()).contiguous(),
            span=self.span if same_bytes else None,
            sources=self.sources,
            actions=(*self.actions, action),
            cast_from=self.cast_from if same_bytes else None,
            lineage=Lineage(lambda ts: fn(ts[0]), (self,)),
        )

    def narrow(self, dim: int, start: int, length: int, action: Action) -> TensorRef:
        """Elements ``start`` to ``start + length`` of dimension ``dim``, as ``Tensor.narrow``.

        When that slice is one contiguous run of the parent's bytes (every dimension before
        ``dim`` has size 1: a split of a fused qkv matrix by rows, a vocabulary cut short),
        the part keeps the matching piece of the parent's file span, or of the bytes it is
        cast from, so writers still copy or convert it straight from disk.
        """
        ref = self.derive(lambda t: t.narrow(dim, start, length), action)  # checks the range
        dim %= len(self.shape)
        if start < 0:  # as in narrow, counted from the end
            start += self.shape[dim]
        if math.prod(self.shape[:dim]) != 1:
            return ref
        row = math.prod(self.shape[dim + 1 :])  # elements per index of ``dim``
        if self.span is not None and self.span.length == self.nbytes:
            size = dtype_itemsize(self.dtype)
            ref = replace(ref, span=self.span.sub(start * row * size, length * row * size))
        if self.cast_from is not None:
            size = dtype_itemsize(self.cast_from.dtype)
            span = self.cast_from.span.sub(start * row * size, length * row * size)
            ref = replace(ref, cast_from=CastSpan(span, self.cast_from.dtype))
        return ref

    def cast(self, dtype: torch.dtype) -> TensorRef:
        """This tensor converted to ``dtype`` as ``Tensor.to`` does (round to nearest even).

        A cast of bytes that sit whole in a file records them as ``cast_from``, so writers
        can convert piece by piece in constant memory.
        """
        action = Action("cast", f"to {dtype_name(dtype)}")
        if dtype == self.dtype:
            return self.with_action(action)
        # A cast keeps every element in its place: replayed, it moves nothing.
        ref = replace(self.derive(lambda t: t.to(dtype), action), lineage=Lineage(_first, (self,)))
        if self.span is not None and self.span.length == self.nbytes:
            ref = replace(ref, cast_from=CastSpan(self.span, self.dtype))
        return ref


def combine(
    parts: Sequence[TensorRef],
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    action: Action,
) -> TensorRef:
    """A new ref computed from several refs (a merge); shape and dtype found on meta."""
    metas = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in parts]
    meta = fn(metas)
    parts = tuple(parts)
    return TensorRef(
        shape=tuple(meta.shape),
        dtype=meta.dtype,
        loader=lambda: fn([p.load() for p in parts]).contiguous(),
        sources=tuple(s for p in parts for s in p.sources),
        actions=(action,),
        lineage=Lineage(fn, parts),
    )


@dataclass(frozen=True)
class Lineage:
    """``fn`` applied to the tensors of ``inputs`` made a ref."""

    fn: Callable[[list[torch.Tensor]], torch.Tensor]
    inputs: tuple[TensorRef, ...]


def replay(ref: TensorRef, leaf: Callable[[TensorRef], torch.Tensor]) -> torch.Tensor:
    """Run the steps that made ``ref`` again, starting from ``leaf(r)`` for each ref ``r``
    they started from (one without lineage: as a reader made it) instead of its data.

    Started from element indices, this tells where each element of the result came from
    through splits, merges, permutations and transposes; a cast replays as a no-op.
    """
    if ref.lineage is None:
        return leaf(ref)
    return ref.lineage.fn([replay(r, leaf) for r in ref.lineage.inputs])


def _first(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def from_tensor(tensor: torch.Tensor, source: str, action: Action | None = None) -> TensorRef:
    """Wrap an in-memory (or memory-mapped) tensor as a ref."""
    return TensorRef(
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        loader=lambda: tensor,
        sources=(source,),
        actions=(action,) if action else (),
    )


def dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


Table = dict[str, TensorRef]
"""Name -> tensor ref, in checkpoint order. Rules map one table to the next."""


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    dtype = getattr(torch, canonical_dtype(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def cast_floating(table: Table, dtype: torch.dtype) -> Table:
    """Cast floating-point tensors to ``dtype``; integer and bool tensors stay as they are."""
    return {
        name: ref.cast(dtype) if ref.dtype.is_floating_point and ref.dtype != dtype else ref
        for name, ref in table.items()
    }


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> tensor that reads each tensor when it is asked for (and
    moves it to ``device``, when given)."""

    def __init__(self, table: Table, device: torch.device | str | None = None) -> None:
        self._table = table
        self._device = torch.device(device) if device is not None else None

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._table[name].load()
        return tensor if self._device is None else tensor.to(self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def ref(self, name: str) -> TensorRef:
        """The lazy reference behind ``name`` (shape and dtype without reading data)."""
        return self._table[name]
