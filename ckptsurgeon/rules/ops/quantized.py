"""Quantized layouts: blockwise-scaled float8 weights back to a float dtype (dequantize)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, PositiveInt, model_validator

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.actions import Action
from ckptsurgeon.rules.config import FloatDType, Pattern
from ckptsurgeon.rules.ops.base import Context, Op, check_template, register
from ckptsurgeon.rules.ops.kernels import _dequantize_blocks

if TYPE_CHECKING:
    import torch

    from ckptsurgeon.formats.table import Table, TensorRef


FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


@register
class Dequantize(Op):
    """Blockwise-scaled float8 weights (DeepSeek-V3's layout, also compressed-tensors'
    fp8 ``block`` strategy) to ``dtype``, as DeepSeek's ``weight_dequant`` does.

    Every float8 tensor matching ``pattern`` is dequantized (others are left alone, so
    ``'\\.weight$'`` skips bf16 norms); its scale is the tensor named
    ``re.sub(pattern, scale, key)``, e.g. ``'\\g<0>_scale_inv'`` -> ``…weight_scale_inv``.
    With ``block`` [b0, b1] the scale has shape (ceil(rows / b0), ceil(cols / b1)) and
    element (i, j) multiplies block (i, j) of the weight; edge blocks may be partial. A
    scale with one element scales the whole tensor (per-tensor fp8). The product is taken
    in float32, then cast to ``dtype``; it is computed one block-row at a time, when the
    result is written. Scales used are dropped; a float8 weight without one is exit 1.
    """

    op: Literal["dequantize"] = "dequantize"
    pattern: Pattern
    scale: str = Field(min_length=1, description=r"scale name template, e.g. '\g<0>_scale_inv'")
    block: list[PositiveInt] = Field(default_factory=lambda: [128, 128], min_length=1)
    dtype: FloatDType = "bfloat16"

    @model_validator(mode="after")
    def _template_fits(self) -> Dequantize:
        check_template(self.pattern, self.scale)
        return self

    def rewrite(self, table: Table, ctx: Context) -> tuple[Table, int]:
        from ckptsurgeon.formats.table import dtype_name, parse_dtype

        scale_of: dict[str, str] = {}
        for name, ref in table.items():
            if dtype_name(ref.dtype) in FP8_DTYPES and self.regex.search(name):
                scale = self.regex.sub(self.scale, name, count=1)
                if scale not in table or scale == name:
                    raise FitError(f"{ctx.where}: float8 {name!r} has no scale tensor {scale!r}")
                scale_of[name] = scale
        scales = {s: w for w, s in scale_of.items()}
        dtype = parse_dtype(self.dtype)
        out: Table = {}
        for name, ref in table.items():
            if name in scale_of:
                out[name] = self._dequantized(name, ref, table[scale_of[name]], dtype, ctx)
            elif name not in scales:
                out[name] = ref
        ctx.dropped.update(
            {s: f"{ctx.where}: the scale of {w!r}, folded into it" for s, w in scales.items()}
        )
        return out, len(scale_of)

    def _dequantized(
        self, name: str, ref: TensorRef, scale: TensorRef, dtype: torch.dtype, ctx: Context
    ) -> TensorRef:
        from ckptsurgeon.formats.table import TensorRef, dtype_name

        shape = ref.shape
        block = list(shape) if scale.numel == 1 else list(self.block)
        if len(block) != len(shape):
            raise FitError(
                f"{ctx.where}: {name!r} {list(shape)} has {len(shape)} dims but block "
                f"{self.block} has {len(self.block)}"
            )
        blocks = tuple(-(-size // max(b, 1)) for size, b in zip(shape, block, strict=True))
        if scale.numel != 1 and scale.shape != blocks:
            raise FitError(
                f"{ctx.where}: scale of {name!r} {list(shape)} is {list(scale.shape)}; "
                f"blocks of {self.block} need {list(blocks)}"
            )

        def load() -> torch.Tensor:
            return _dequantize_blocks(ref.load(), scale.load().reshape(blocks), block, dtype)

        return TensorRef(
            shape=shape,
            dtype=dtype,
            loader=load,
            sources=(*ref.sources, *scale.sources),
            actions=(
                *ref.actions,
                Action(
                    "dequantized",
                    f"{dtype_name(ref.dtype)} to {dtype_name(dtype)} "
                    f"(blocks {'x'.join(map(str, block))})",
                ),
            ),
        )
