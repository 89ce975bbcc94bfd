"""What the inference phases share: the table as the rules so far leave it, what was found,
and the keys held out of every rule.

It is a module of its own, below :mod:`~ckptsurgeon.suggest.infer`, so that each phase
(:mod:`~ckptsurgeon.suggest.align`, :mod:`~ckptsurgeon.suggest.fused`,
:mod:`~ckptsurgeon.suggest.shapes`, :mod:`~ckptsurgeon.suggest.leftovers`) can take the
state and build findings while ``infer``, which runs the phases in order, imports them: the
imports flow one way. The phases are plain functions over one :class:`State`, because each
one reads what the earlier ones left (the working table, the held keys) and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.table import Table
from ckptsurgeon.rules.ops import OPS, Context
from ckptsurgeon.targets.spec import TargetInfo

Rule = dict[str, Any]


@dataclass
class Finding:
    """One difference, explained, with the rule that reconciles it (None: nothing to do)."""

    kind: (
        str  # strip_prefix, add_prefix, rename, map, split, merge, adapt, reinit, fill, drop, dtype
    )
    summary: str
    keys: int
    rule: Rule | None = None

    @property
    def line(self) -> str:
        """The summary with the number of keys the rule covers (the rule's comment)."""
        return f"{self.summary} ({plural(self.keys, 'key')})"


@dataclass
class Unresolved:
    """Keys no rule is suggested for, and why."""

    names: list[str]
    reason: str


class State:
    """The working state: the table as the rules so far leave it, and what was found."""

    def __init__(self, table: Table, target: TargetInfo) -> None:
        self.source = table
        self.table = table
        self.target = target
        self.expected = target.expected
        self.findings: list[Finding] = []
        self.drops: list[Finding] = []
        self.notes: list[Finding] = []
        self.unresolved: list[Unresolved] = []
        self.held_sources: set[str] = set()  # original checkpoint names, never dropped
        self.held_targets: set[str] = set()  # target names, never filled
        # align's prefix rewrites found ambiguous or useless: never tried again
        self.banned: set[tuple[str, str, bool]] = set()

    def run(self, rule: Rule) -> tuple[Table, int]:
        """Run one rule with the real op; raises FitError as ``apply`` would."""
        op = OPS[rule["op"]].model_validate(rule)
        return op.rewrite(self.table, Context(target=self.target, where=f"suggested {rule['op']}"))

    def matched(self, table: Table) -> int:
        """How many of ``table``'s names the target has."""
        return sum(1 for name in table if name in self.expected)

    def held(self, name: str) -> bool:
        """Does this working key come from a checkpoint key held out of every rule?"""
        return any(s in self.held_sources for s in self.table[name].sources)

    def hold(self, names: Iterable[str]) -> None:
        """Keep these (working checkpoint names or target names) out of every rule."""
        for name in names:
            if name in self.table and name not in self.expected:
                self.held_sources.update(self.table[name].sources)
            else:
                self.held_targets.add(name)

    def unmatched(self) -> tuple[list[str], list[str]]:
        """(checkpoint keys the target lacks, target keys the checkpoint lacks), unheld.

        A target key the model ties to a key the table has (``lm_head.weight`` and the
        embeddings) is not lacking: the model fills it from the shared tensor."""
        extra = [n for n in self.table if n not in self.expected and not self.held(n)]
        missing = [
            t
            for t in self.expected
            if t not in self.table and t not in self.held_targets and not self.tied_present(t)
        ]
        return extra, missing

    def tied_present(self, name: str) -> bool:
        """Does the table hold a key the target model ties ``name`` to?"""
        return any(p in self.table for p in self.target.tied.get(name, ()))

    def add(self, kind: str, rule: Rule, summary: str) -> None:
        """Run ``rule`` and keep it with its finding; a failure is reported, not raised."""
        try:
            table, matched = self.run(rule)
        except FitError as exc:
            self.unresolved.append(Unresolved([], f"a suggested {rule['op']} failed: {exc}"))
            return
        self.table = table
        self.findings.append(Finding(kind, summary, matched, rule))


def plural(n: int, word: str) -> str:
    """``plural(1, "key")`` -> ``"1 key"``; ``plural(2, "key")`` -> ``"2 keys"``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def either(names: list[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``: the rivals a message names, shared by
    every phase that reports a key it will not guess about, so they all read alike."""
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
