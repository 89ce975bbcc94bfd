"""A ``scale`` rule op: ``{op: scale, pattern: '\\.weight$', factor: 0.5}``.

Declared in pyproject.toml under ``[project.entry-points."ckptsurgeon.ops"]``; once the
distribution is installed, rules files can use it as they use a built-in op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ckptsurgeon.rules.ops import Action, Context, Pattern, TensorOp

if TYPE_CHECKING:
    from ckptsurgeon.rules.ops import TensorRef


class Scale(TensorOp):
    """Multiply each floating-point tensor whose name matches ``pattern`` by ``factor``.

    Integer and bool tensors (counters such as ``num_batches_tracked``, masks) are left
    unchanged and do not count as matches: scaling them would round or overflow silently.
    """

    # The fields are the op's schema: `validate` and `schema` read them, torch unloaded.
    op: Literal["scale"] = "scale"
    pattern: Pattern
    factor: float

    def selects(self, name: str, ref: TensorRef) -> bool:
        return ref.dtype.is_floating_point and super().selects(name, ref)

    def transform(self, name: str, ref: TensorRef, ctx: Context) -> TensorRef:
        factor = self.factor
        # derive() keeps the op lazy: nothing is read until the output is written, and the
        # Action is what the plan and the report show for this tensor.
        return ref.derive(lambda t: t * factor, Action("scaled", f"by {factor:g}"))
