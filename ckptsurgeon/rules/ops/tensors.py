"""Ops that replace each matching tensor by a function of it (cast, transpose, reshape,
resize, adapt_input_channels, permute_rope): the new refs are derived lazily, their shapes
worked out on the meta device."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, PositiveInt

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import DType, Pattern
from ckptsurgeon.rules.ops.base import Context, TensorOp, register
from ckptsurgeon.targets.seeds import derive_seed

if TYPE_CHECKING:
    import torch

    from ckptsurgeon.formats.table import TensorRef


@register
class Cast(TensorOp):
    """Change dtype. Without ``pattern`` only floating-point tensors are cast (integer
    buffers such as BatchNorm's ``num_batches_tracked`` keep their type)."""

    op: Literal["cast"] = "cast"
    dtype: DType
    pattern: Pattern | None = None  # type: ignore[assignment]

    def selects(self, name: str, ref: TensorRef) -> bool:
        if self.pattern is None:
            return ref.dtype.is_floating_point
        return bool(self.regex.search(name))

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        from ckptsurgeon.formats.table import parse_dtype

        return ref.cast(parse_dtype(self.dtype))


@register
class Transpose(TensorOp):
    """Swap two dimensions (e.g. Conv1D <-> Linear weights)."""

    op: Literal["transpose"] = "transpose"
    dims: tuple[int, int] = (0, 1)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        a, b = self.dims
        return ref.derive(lambda t: t.transpose(a, b), Action("transposed", f"{a},{b}"))


@register
class Reshape(TensorOp):
    """View with a new shape of the same number of elements (one -1 allowed)."""

    op: Literal["reshape"] = "reshape"
    shape: list[int] = Field(min_length=0)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        shape = tuple(self.shape)
        return ref.derive(
            lambda t: t.reshape(shape), Action("reshaped", f"to {list(shape)}"), keeps_bytes=True
        )


@register
class Resize(TensorOp):
    """Pad or truncate along ``dim`` to ``size`` (vocabulary, classes). New slices are
    ``zeros``, ``normal`` (mean 0, ``std``) or the ``mean`` of the existing slices."""

    op: Literal["resize"] = "resize"
    dim: int = 0
    size: int = Field(gt=0)
    init: Literal["zeros", "normal", "mean"] = "mean"
    std: float = Field(0.02, gt=0)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        import torch

        dim, size = self.dim, self.size
        if not -len(ref.shape) <= dim < len(ref.shape):
            raise FitError(f"{ctx.where}: {name!r} {list(ref.shape)} has no dim {dim}")
        old = ref.shape[dim]
        if size == old:
            return ref
        action = Action("resized", f"dim {dim} {old}->{size} ({self.init})")
        if size < old:
            return ref.narrow(dim, 0, size, action)
        if old == 0 and self.init == "mean":
            raise FitError(
                f"{ctx.where}: {name!r} dim {dim} is empty, so it has no mean; "
                "use init: zeros or normal"
            )
        seed = derive_seed(ctx.seed, name)

        def resize(t: torch.Tensor) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = size - old
            if t.device.type == "meta" or self.init == "zeros":
                extra = torch.zeros(shape, dtype=t.dtype, device=t.device)
            elif self.init == "mean":
                extra = t.float().mean(dim, keepdim=True).expand(shape).to(t.dtype)
            else:
                gen = torch.Generator().manual_seed(seed)
                extra = (torch.randn(shape, generator=gen) * self.std).to(t.dtype)
            return torch.cat([t, extra], dim)

        return ref.derive(resize, action)


@register
class AdaptInputChannels(TensorOp):
    """A first conv from 3 to ``channels`` input channels, as timm does: 1 sums over the
    input channels; N repeats them ceil(N/3) times, keeps N, and rescales by 3/N."""

    op: Literal["adapt_input_channels"] = "adapt_input_channels"
    channels: int = Field(gt=0)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        n = self.channels
        if len(ref.shape) < 3:
            raise FitError(f"{ctx.where}: {name!r} {list(ref.shape)} is not a conv weight")
        old = ref.shape[1]
        if n != 1 and old != 3:
            raise FitError(
                f"{ctx.where}: {name!r} has {old} input channels; only 3 -> N is "
                "defined (and anything -> 1)"
            )

        def adapt(t: torch.Tensor) -> torch.Tensor:
            w = t.float()
            if n == 1:
                w = w.sum(dim=1, keepdim=True)
            else:
                w = w.repeat(1, math.ceil(n / 3), *([1] * (w.dim() - 2)))[:, :n] * (3 / n)
            return w.to(t.dtype)

        return ref.derive(adapt, Action("input", f"channels {old}->{n}"))


@register
class PermuteRope(TensorOp):
    """Reorder the rows of rotary q/k projections (weights and biases) between the
    interleaved layout (Meta's original Llama, GGUF: each head's rotary pairs sit in adjacent
    rows) and the half-split layout transformers' ``rotate_half`` expects (a head's first
    halves, then its second halves), as ``transformers``' ``PermuteForRope`` does.

    The rows are viewed as (heads, half_head, 2) and transposed to (heads, 2, half_head);
    ``inverse`` goes back. A wrong ``heads`` still yields a valid-looking tensor, so the
    shape is checked at planning time, but only the user can give the right head count
    (the KV head count for a grouped-query ``k_proj``).
    """

    op: Literal["permute_rope"] = "permute_rope"
    heads: PositiveInt
    inverse: bool = False

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        if len(ref.shape) not in (1, 2):
            raise FitError(
                f"{ctx.where}: {name!r} {list(ref.shape)} is neither a 2-D weight nor a 1-D bias"
            )
        heads, rows = self.heads, ref.shape[0]
        if rows % (2 * heads):
            raise FitError(
                f"{ctx.where}: {name!r} {list(ref.shape)} has {rows} rows, not divisible "
                f"by 2 * heads = {2 * heads}"
            )
        half = rows // heads // 2
        pairs = (2, half) if self.inverse else (half, 2)

        def permute(t: torch.Tensor) -> torch.Tensor:
            rest = t.shape[1:]
            return t.reshape(heads, *pairs, *rest).transpose(1, 2).reshape(rows, *rest)

        way = "back to interleaved" if self.inverse else "to half-split"
        return ref.derive(permute, Action("permuted", f"rope rows {way} ({heads} heads)"))
