"""Infer the rules that make a checkpoint's table load strictly into a target.

The steps follow how a person reconciles a ``Missing key(s) ... Unexpected key(s)`` wall:

1. **Align names** by rewriting whole-segment prefixes: strip ``module.``, add ``bert.``,
   ``blocks.N.`` -> ``layers.N.``. Every (checkpoint prefix, target prefix) pair that turns
   an unmatched checkpoint key into an unmatched target key is a candidate. The candidate
   matching most keys wins; then the one with most shapes agreeing; then a raw copy over an
   EMA copy; then the one rewriting fewest segments (the longest common dotted suffix, as
   detectron2's ``align_and_update_state_dicts`` prefers). Equally good candidates that
   disagree about a key are reported as ambiguous, never guessed between. A rename (both
   prefixes non-empty) must keep a module and a leaf in common and agree on some shape, so
   ``head.weight`` is never taken for ``fc.weight`` on the leaf alone. Candidates matching
   one key each become one ``map``.
2. **Split or merge** fused attention projections (``qkv`` <-> ``q``, ``k``, ``v``) when the
   parts' shapes add up to exactly one tensor under the same parent module (else anywhere
   in the same block). Rows are taken in q, k, v order; GPT-NeoX's interleaved
   ``query_key_value`` is reported instead.
3. **Shapes**: a first conv whose input channels changed 3 -> N is adapted as timm does;
   other mismatched keys (new heads) take the target's fresh values.
4. **Leftovers**: target keys nothing maps to are filled fresh and checkpoint keys with no
   counterpart are dropped, except keys that took part in an ambiguity and leftovers that
   look like one tensor under two names (a whole module with the same tensors, or a key of
   two or more dimensions with the same shape): those are reported, because filling them
   would silently replace trained weights with random ones.

Each step runs its rule with the real op on the working table, so what is inferred is what
``apply`` will do; the caller still verifies the whole file with ``run_rules``. Drops are
computed last but listed first, on the checkpoint's own names, so the file reads in the
order a person thinks: discard what is not needed, then rename, then re-create.

The steps live one to a module, each a plain function over the shared
:class:`~ckptsurgeon.suggest.state.State`: :mod:`~ckptsurgeon.suggest.align` (1),
:mod:`~ckptsurgeon.suggest.fused` (2), :mod:`~ckptsurgeon.suggest.shapes` (3) and
:mod:`~ckptsurgeon.suggest.leftovers` (4). This module only runs them in order and counts
what the rules, in their final order, cover.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.table import Table
from ckptsurgeon.rules.ops import OPS, Context
from ckptsurgeon.suggest.align import align
from ckptsurgeon.suggest.fused import fuse
from ckptsurgeon.suggest.leftovers import leftovers
from ckptsurgeon.suggest.shapes import shapes
from ckptsurgeon.suggest.state import Finding, Rule, State, Unresolved, plural
from ckptsurgeon.targets.spec import TargetInfo

# Finding, Unresolved, Rule and plural are defined with the state the phases share (so the
# phases need not import this module, which imports them) but are imported from here.
__all__ = ["Finding", "Inference", "Rule", "Unresolved", "infer_rules", "plural"]


@dataclass
class Inference:
    """The findings in rule order (those with a rule form the rules file) and what is left."""

    findings: list[Finding]
    unresolved: list[Unresolved]

    @property
    def rules(self) -> list[Rule]:
        """The rules file's rules, in order: the findings that reconcile something."""
        return [f.rule for f in self.findings if f.rule is not None]


def infer_rules(table: Table, target: TargetInfo) -> Inference:
    """The rules that would make ``table`` load strictly into ``target``, each explained."""
    state = State(table, target)
    align(state)
    fuse(state)
    shapes(state)
    leftovers(state)
    findings = [*state.drops, *state.findings, *state.notes]
    _count(findings, table, target)
    return Inference(findings, state.unresolved)


def _count(findings: list[Finding], table: Table, target: TargetInfo) -> None:
    """Set each finding's key count from a replay of the rules in their final order (the
    drops, inferred last, run first, so the counts seen during inference can be off)."""
    ctx = Context(target=target)
    for finding in findings:
        if finding.rule is None:
            continue
        try:
            table, finding.keys = (
                OPS[finding.rule["op"]].model_validate(finding.rule).rewrite(table, ctx)
            )
        except FitError:
            return  # the verification that follows reports it
