"""The rule ops: one class per op, holding its fields (the schema) and its behaviour.

Ops transform the lazy table (name -> TensorRef) without reading tensor data: renames move
refs, tensor ops derive new refs whose shapes are worked out on the meta device. One module
per family:

- :mod:`~ckptsurgeon.rules.ops.base`: ``Op``, ``TensorOp``, ``Context``, the registry
  (``OPS``, ``@register``) and the helpers every family uses;
- :mod:`~ckptsurgeon.rules.ops.keys`: names (strip_prefix, add_prefix, rename, map, drop,
  keep, copy);
- :mod:`~ckptsurgeon.rules.ops.tensors`: one tensor at a time (cast, transpose, reshape,
  resize, adapt_input_channels, permute_rope);
- :mod:`~ckptsurgeon.rules.ops.fused`: fused layouts (split, merge);
- :mod:`~ckptsurgeon.rules.ops.combining`: values from outside the table (take, average,
  merge_lora, reinit_mismatched, fill_missing);
- :mod:`~ckptsurgeon.rules.ops.quantized`: dequantize;
- :mod:`~ckptsurgeon.rules.ops.kernels`: the numeric loops behind average and dequantize.

This package holds the registry as the rest of ckptsurgeon sees it: the built-ins, then the
ops that installed distributions declare in the ``ckptsurgeon.ops`` entry-point group
(SPEC, "Extending ckptsurgeon"), and ``AnyOp``, the union the rules file validates against,
built from both. Adding a built-in op means writing one class in its family's module and
decorating it with ``@register``; a plug-in op subclasses ``Op`` or ``TensorOp`` and imports
what it needs from this package's public names.

torch is imported inside the few methods that build tensors, so that ``validate`` and
``schema``, which only need the fields, never pay for importing it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Field

from ckptsurgeon.formats.actions import Action
from ckptsurgeon.plugins import OPS_GROUP, load_group
from ckptsurgeon.rules.config import Pattern
from ckptsurgeon.rules.ops.base import (
    OPS,
    Context,
    Op,
    TensorOp,
    build_table,
    check_template,
    register,
    rename_keys,
)
from ckptsurgeon.rules.ops.kernels import AVERAGE_CHUNK

# Each family registers its ops as it is imported: this order is the rules union's, and so
# the order in which `schema` lists the built-ins.
# isort: off
from ckptsurgeon.rules.ops.keys import AddPrefix, Copy, Drop, Keep, Map, Rename, StripPrefix
from ckptsurgeon.rules.ops.tensors import (
    AdaptInputChannels,
    Cast,
    PermuteRope,
    Reshape,
    Resize,
    Transpose,
)
from ckptsurgeon.rules.ops.fused import Merge, Split
from ckptsurgeon.rules.ops.combining import (
    Average,
    FillMissing,
    FromSources,
    MergeLora,
    ReinitMismatched,
    Take,
)
from ckptsurgeon.rules.ops.quantized import FP8_DTYPES, Dequantize
# isort: on

if TYPE_CHECKING:  # for a plug-in's annotations
    from ckptsurgeon.formats.table import Table as Table
    from ckptsurgeon.formats.table import TensorRef as TensorRef

__all__ = [
    "AVERAGE_CHUNK",
    "FP8_DTYPES",
    "OPS",
    "Action",
    "AdaptInputChannels",
    "AddPrefix",
    "AnyOp",
    "Average",
    "Cast",
    "Context",
    "Copy",
    "Dequantize",
    "Drop",
    "FillMissing",
    "FromSources",
    "Keep",
    "Map",
    "Merge",
    "MergeLora",
    "Op",
    "Pattern",
    "PermuteRope",
    "ReinitMismatched",
    "Rename",
    "Reshape",
    "Resize",
    "Split",
    "StripPrefix",
    "Take",
    "TensorOp",
    "Transpose",
    "build_table",
    "check_template",
    "register",
    "rename_keys",
]


def _load_plugins() -> None:
    """Register the ops installed distributions declare; a plug-in never replaces a
    built-in or an earlier plug-in (see :func:`ckptsurgeon.plugins.load_group`)."""
    claimed: dict[str, str] = {}  # op name -> the entry point that took it

    def accept(name: str, obj: Any) -> str | None:
        if not (isinstance(obj, type) and issubclass(obj, Op)):
            what = f"class {obj.__qualname__}" if isinstance(obj, type) else type(obj).__name__
            return f"it is a {what}, not a subclass of ckptsurgeon.rules.ops.Op"
        field = obj.model_fields.get("op")
        op = field.default if field is not None else None
        if not isinstance(op, str):
            return "it has no 'op' field with a string default"
        # The rules union tells ops apart by this field: anything but Literal[op] would
        # break building the union for every op, built-ins included.
        if get_origin(field.annotation) is not Literal or get_args(field.annotation) != (op,):
            return f"its 'op' field must be declared as Literal[{op!r}]"
        if inspect.isabstract(obj):
            return f"it does not implement {', '.join(sorted(obj.__abstractmethods__))}"
        if op in OPS:
            return f"op {op!r} is already taken by a built-in op"
        if op in claimed:
            return f"op {op!r} is already taken by plug-in {claimed[op]!r}"
        claimed[op] = name
        return None

    for _distribution, cls in load_group(OPS_GROUP, accept):
        register(cls)


_load_plugins()


def _op_union() -> Any:
    return Annotated[Union[tuple(OPS.values())], Field(discriminator="op")]  # noqa: UP007


AnyOp = _op_union()
