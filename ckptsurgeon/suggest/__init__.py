"""``diff`` and ``diff --suggest``: find the differences between a checkpoint and a target,
explain them the way a person thinks about them, and write the rules that reconcile them.

* :mod:`~ckptsurgeon.suggest.names`: dotted names, layer indices, covering regexes.
* :mod:`~ckptsurgeon.suggest.infer`: the rules, inferred step by step, each explained; the
  steps are :mod:`~ckptsurgeon.suggest.align`, :mod:`~ckptsurgeon.suggest.fused`,
  :mod:`~ckptsurgeon.suggest.shapes` and :mod:`~ckptsurgeon.suggest.leftovers`, over the
  shared :mod:`~ckptsurgeon.suggest.state`.
* :mod:`~ckptsurgeon.suggest.diff`: the comparison, and the rules verified by running them.
* :mod:`~ckptsurgeon.suggest.render`: the rules file, commented, as ``apply`` reads it.
"""

from ckptsurgeon.suggest.diff import DiffReport, compare
from ckptsurgeon.suggest.infer import Finding, Inference, Unresolved, infer_rules
from ckptsurgeon.suggest.render import absolute_target, render_rules

__all__ = [
    "DiffReport",
    "Finding",
    "Inference",
    "Unresolved",
    "absolute_target",
    "compare",
    "infer_rules",
    "render_rules",
]
