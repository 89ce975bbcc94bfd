"""The numeric kernels behind the ops: the weighted mean of ``average`` (float64, a piece at
a time when the inputs lie whole in files) and the blockwise float8 dequantization of
``dequantize``. They run when the result is written, not when it is planned."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ckptsurgeon.formats.actions import Action

if TYPE_CHECKING:
    import torch

    from ckptsurgeon.formats.table import TensorRef


AVERAGE_CHUNK = 1 << 20  # elements averaged at a time when every input lies whole in a file


def _weighted_mean(
    first: TensorRef, others: list[TensorRef], weights: list[float], action: Action
) -> TensorRef:
    """A lazy ``sum(w_i * x_i) / sum(w)`` in float64, cast to ``first``'s dtype. Memory
    does not grow with the number of inputs: when every input's bytes lie whole in a file
    (safetensors) the sum runs over ``AVERAGE_CHUNK`` elements at a time, reading each
    input's piece; otherwise only the accumulator and one input are held. Unit weights add
    without multiplying, so equal weights give exactly timm's ``avg_checkpoints`` (sum,
    then divide by the count); both ways round each element alike."""
    from dataclasses import replace
    from functools import partial

    import torch

    refs = [first, *others]
    total = math.fsum(weights)

    def mean_of(parts: Callable[[TensorRef], torch.Tensor]) -> torch.Tensor:
        acc = parts(first).to(torch.float64, copy=True)
        if weights[0] != 1.0:
            acc.mul_(weights[0])
        for ref, weight in zip(others, weights[1:], strict=True):
            acc.add_(parts(ref), alpha=weight)
        return acc.div_(total)

    def mean() -> torch.Tensor:
        if not all(r.span is not None and r.span.length == r.nbytes for r in refs):
            return mean_of(lambda r: r.load()).to(first.dtype)
        out = torch.empty(first.shape, dtype=first.dtype)
        flat = out.view(-1)
        for start in range(0, first.numel, AVERAGE_CHUNK):
            count = min(AVERAGE_CHUNK, first.numel - start)
            flat[start : start + count] = mean_of(partial(_elements, start=start, count=count))
        return out

    return replace(
        first, loader=mean, span=None, cast_from=None, actions=(*first.actions, action),
        lineage=None,  # a computed value: replaying it would not say where it came from
    )  # fmt: skip


def _elements(ref: TensorRef, start: int, count: int) -> torch.Tensor:
    """Elements ``start`` to ``start + count`` of ``ref`` (flat), read from its file span."""
    import torch

    from ckptsurgeon.formats.spans import read_span

    assert ref.span is not None
    size = ref.dtype.itemsize
    return torch.frombuffer(read_span(ref.span.sub(start * size, count * size)), dtype=ref.dtype)


def _dequantize_blocks(
    weight: torch.Tensor, scale: torch.Tensor, block: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """``weight * scale`` with each scale element spread over its block, in float32 and
    cast to ``dtype``; one block-row at a time, so the float32 product never exists whole."""
    import torch

    if weight.dim() == 0:
        return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)
    out = torch.empty(weight.shape, dtype=dtype)
    rows = max(block[0], 1)
    for i in range(scale.shape[0]):
        part = weight[i * rows : (i + 1) * rows].to(torch.float32)
        factor = scale[i : i + 1].to(torch.float32)
        for dim in range(1, weight.dim()):
            factor = factor.repeat_interleave(block[dim], dim).narrow(dim, 0, weight.shape[dim])
        out[i * rows : (i + 1) * rows] = part.mul_(factor)
    return out
