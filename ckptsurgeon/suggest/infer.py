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
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from ckptsurgeon.errors import FitError
from ckptsurgeon.formats.table import Table, dtype_name
from ckptsurgeon.rules.ops import OPS, Context
from ckptsurgeon.suggest import names as nm
from ckptsurgeon.targets.check import group_names
from ckptsurgeon.targets.spec import TargetInfo

Rule = dict[str, Any]

# Leaf names of buffers that models register as non-persistent in current versions but
# older checkpoints still carry (transformers < 4.31 saved position_ids, for instance).
NON_PERSISTENT_HINTS = {"position_ids", "token_type_ids", "inv_freq", "masked_bias"}

# Fused projections whose rows are not [q; k; v] blocks (GPT-NeoX interleaves per head):
# a split by shape alone would scramble them.
INTERLEAVED_FUSED = {"query_key_value"}

MAX_DROP_RULES = 12

# 1-D keys that are multiplied in, not added: a norm's scale (LayerNorm, BatchNorm, RMSNorm,
# GPT-2's ln_1, timm's gamma) or a running variance. Fresh ones start at one, as torch's do.
_ONES = re.compile(
    r"(?:^|\.)(?:[^.]*(?:norm|ln|bn)[^.]*\.(?:weight|scale)|gamma|running_var)$", re.IGNORECASE
)


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


@dataclass
class Inference:
    """The findings in rule order (those with a rule form the rules file) and what is left."""

    findings: list[Finding]
    unresolved: list[Unresolved]

    @property
    def rules(self) -> list[Rule]:
        return [f.rule for f in self.findings if f.rule is not None]


def infer_rules(table: Table, target: TargetInfo) -> Inference:
    """The rules that would make ``table`` load strictly into ``target``, each explained."""
    work = _Inferrer(table, target)
    work.align()
    work.fuse()
    work.shapes()
    work.leftovers()
    findings = [*work.drops, *work.findings, *work.notes]
    _count(findings, table, target)
    return Inference(findings, work.unresolved)


def _count(findings: list[Finding], table: Table, target: TargetInfo) -> None:
    """Set each finding's key count from a replay of the rules in their final order (the
    drops, inferred last, run first, so the counts seen during inference can be off)."""
    ctx = Context(target=target)
    for finding in findings:
        if finding.rule is None:
            continue
        try:
            table, finding.keys = (
                OPS[finding.rule["op"]].model_validate(finding.rule).apply(table, ctx)
            )
        except FitError:
            return  # the verification that follows reports it


@dataclass
class _Candidate:
    """A prefix rewrite and the checkpoint keys it would turn into target keys."""

    key: tuple[str, str, bool]  # (checkpoint prefix, target prefix, indices generalised)
    mapping: dict[str, str] = field(default_factory=dict)  # checkpoint key -> target key
    heads: set[tuple[str, str]] = field(default_factory=set)  # concrete prefix pairs
    shape_ok: int = 0

    def rank(self) -> tuple[int, int, bool, int]:
        """Keys matched, then shapes agreeing, then raw before EMA, then fewest segments
        rewritten (the longest common suffix): greater is better."""
        depth = len(nm.prefix_segments(self.key[0])) + len(nm.prefix_segments(self.key[1]))
        return (len(self.mapping), self.shape_ok, not nm.mentions_ema(self.key[0]), -depth)

    def conflicts(self, other: _Candidate) -> bool:
        """Do the two disagree about where a key goes or where a target key comes from?"""
        if any(other.mapping.get(s, t) != t for s, t in self.mapping.items()):
            return True
        origin = {t: s for s, t in self.mapping.items()}
        return any(origin.get(t, s) != s for s, t in other.mapping.items())


def _candidate_key(head: str, t_head: str) -> tuple[str, str, bool]:
    """Pairs that carry the same layer indices (``blocks.3.`` -> ``layers.3.``) share one
    candidate with the indices generalised; any other pair is its own literal candidate."""
    found = nm.indices(head)
    if found and found == nm.indices(t_head):
        return nm.skeleton(head), nm.skeleton(t_head), True
    return head, t_head, False


class _Inferrer:
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
        self.banned: set[tuple[str, str, bool]] = set()

    # -- the working table ------------------------------------------------------------

    def _run(self, rule: Rule) -> tuple[Table, int]:
        """Run one rule with the real op; raises FitError as ``apply`` would."""
        op = OPS[rule["op"]].model_validate(rule)
        return op.apply(self.table, Context(target=self.target, where=f"suggested {rule['op']}"))

    def _matched(self, table: Table) -> int:
        """How many of ``table``'s names the target has."""
        return sum(1 for name in table if name in self.expected)

    def _held(self, name: str) -> bool:
        """Does this working key come from a checkpoint key held out of every rule?"""
        return any(s in self.held_sources for s in self.table[name].sources)

    def _hold(self, names: Iterable[str]) -> None:
        """Keep these (working checkpoint names or target names) out of every rule."""
        for name in names:
            if name in self.table and name not in self.expected:
                self.held_sources.update(self.table[name].sources)
            else:
                self.held_targets.add(name)

    def _unmatched(self) -> tuple[list[str], list[str]]:
        """(checkpoint keys the target lacks, target keys the checkpoint lacks), unheld."""
        extra = [n for n in self.table if n not in self.expected and not self._held(n)]
        missing = [t for t in self.expected if t not in self.table and t not in self.held_targets]
        return extra, missing

    def _add(self, kind: str, rule: Rule, summary: str) -> None:
        """Run ``rule`` and keep it with its finding; a failure is reported, not raised."""
        try:
            table, matched = self._run(rule)
        except FitError as exc:
            self.unresolved.append(Unresolved([], f"a suggested {rule['op']} failed: {exc}"))
            return
        self.table = table
        self.findings.append(Finding(kind, summary, matched, rule))

    # -- 1. names -------------------------------------------------------------------

    def align(self) -> None:
        """Prefix rewrites, best first, until none matches another key."""
        while True:
            candidates = self._candidates()
            if not candidates:
                return
            best = max(candidates.values(), key=_Candidate.rank)
            if len(best.mapping) == 1:
                self._align_singles(list(candidates.values()))
                return
            rivals = [
                c
                for c in candidates.values()
                if c is not best and c.rank() == best.rank() and best.conflicts(c)
            ]
            if rivals:
                self._ambiguous([best, *rivals])
                continue
            rule, kind, summary = self._prefix_rule(best)
            try:
                table, matched = self._run(rule)
            except FitError:
                table, matched = self.table, 0
            if self._matched(table) <= self._matched(self.table):
                self.banned.add(best.key)
                continue
            self.table = table
            self.findings.append(Finding(kind, summary, matched, rule))

    def _candidates(self) -> dict[tuple[str, str, bool], _Candidate]:
        """Every prefix rewrite that turns an unmatched key into an unmatched target key."""
        extra, missing = self._unmatched()
        heads_by_rest: dict[str, list[str]] = defaultdict(list)
        for name in missing:
            for t_head, rest in nm.split_prefixes(name):
                heads_by_rest[rest].append(t_head)
        whole = set(missing)
        found: dict[tuple[str, str, bool], _Candidate] = {}
        for name in extra:
            shape = self.table[name].shape
            for head, rest in nm.split_prefixes(name):
                if head and "." not in rest:
                    # A rename must keep a module and a leaf in common, so a bare leaf
                    # ("weight", shared by half the model) only pairs with a whole name.
                    t_heads: Iterable[str] = ("",) if rest in whole else ()
                else:
                    t_heads = heads_by_rest.get(rest, ())
                for t_head in t_heads:
                    key = _candidate_key(head, t_head)
                    if key in self.banned:
                        continue
                    candidate = found.setdefault(key, _Candidate(key))
                    candidate.mapping[name] = t_head + rest
                    candidate.heads.add((head, t_head))
                    candidate.shape_ok += self.expected[t_head + rest][0] == shape
        return {k: c for k, c in found.items() if c.shape_ok}

    def _prefix_rule(self, candidate: _Candidate) -> tuple[Rule, str, str]:
        """The rule for a candidate of two or more keys: (rule, kind, summary)."""
        head, t_head = next(iter(candidate.heads))
        if len({nm.indices(h) for h, _ in candidate.heads}) > 1:
            rule = {
                "op": "rename",
                "pattern": nm.prefix_regex(head, generalise=True),
                "replace": nm.prefix_replacement(t_head, generalise=True),
            }
            summary = (
                f"'{nm.glob(head, generalise=True)}' in the checkpoint is "
                f"'{nm.glob(t_head, generalise=True)}' in the target"
            )
            return rule, "rename", summary
        if not t_head:
            carrying = sum(1 for name in self.table if name.startswith(head))
            summary = (
                f"every checkpoint key carries '{head}'"
                if carrying == len(self.table)
                else f"{carrying} of the {len(self.table)} checkpoint keys carry '{head}', "
                "which the target's names lack"
            )
            return {"op": "strip_prefix", "prefix": head}, "strip_prefix", summary
        if not head:
            rule: Rule = {"op": "add_prefix", "prefix": t_head}
            keep = [n for n in self.table if n in self.expected]  # already right: untouched
            if keep:
                rule["pattern"] = nm.one_pattern(nm.cover(list(candidate.mapping), keep))
            summary = f"the target's names carry '{t_head}', which the checkpoint's lack"
            return rule, "add_prefix", summary
        rule = {
            "op": "rename",
            "pattern": nm.prefix_regex(head),
            "replace": nm.prefix_replacement(t_head),
        }
        return rule, "rename", f"'{head}*' in the checkpoint is '{t_head}*' in the target"

    def _align_singles(self, candidates: list[_Candidate]) -> None:
        """One key per candidate: each checkpoint key goes to its best-ranked target key
        (longest common dotted suffix, same shape), as detectron2 matches; a tie for a
        checkpoint key, or two checkpoint keys for one target key, is reported."""
        options: dict[str, dict[str, tuple]] = defaultdict(dict)
        for candidate in candidates:
            ((source, target),) = candidate.mapping.items()
            if self.table[source].shape != self.expected[target][0]:
                continue  # a single key is matched only with shape agreement
            rank = candidate.rank()
            options[source][target] = max(rank, options[source].get(target, rank))
        chosen: dict[str, list[tuple[tuple, str]]] = defaultdict(list)
        for source, targets in options.items():
            top = max(targets.values())
            best = sorted(t for t, r in targets.items() if r == top)
            if len(best) > 1:
                self._report_ties([(source, best)], "checkpoint key")
            else:
                chosen[best[0]].append((top, source))
        mapping: dict[str, str] = {}
        for target, claims in chosen.items():
            top = max(rank for rank, _ in claims)
            best = sorted(s for rank, s in claims if rank == top)
            if len(best) > 1:
                self._report_ties([(target, best)], "target key")
            else:
                mapping[best[0]] = target
        if mapping:
            shown = ", ".join(f"{s} -> {t}" for s, t in sorted(mapping.items())[:3])
            self._add(
                "map",
                {"op": "map", "mapping": dict(sorted(mapping.items()))},
                f"renamed ({shown}{', ...' if len(mapping) > 3 else ''}): each matches one "
                "target key by its longest common dotted suffix, with the same shape",
            )

    def _ambiguous(self, group: list[_Candidate]) -> None:
        """Equally good prefix rewrites that disagree: report each disputed key, hold it
        out of every later rule, and never use these rewrites."""
        targets_of: dict[str, set[str]] = defaultdict(set)
        sources_of: dict[str, set[str]] = defaultdict(set)
        for candidate in group:
            self.banned.add(candidate.key)
            for source, target in candidate.mapping.items():
                targets_of[source].add(target)
                sources_of[target].add(source)
        self._report_ties(
            [(s, sorted(ts)) for s, ts in targets_of.items() if len(ts) > 1], "checkpoint key"
        )
        self._report_ties(
            [(t, sorted(ss)) for t, ss in sources_of.items() if len(ss) > 1], "target key"
        )

    def _report_ties(self, ties: list[tuple[str, list[str]]], what: str) -> None:
        """Report keys that match several rivals equally well, one line per module
        (``'proj.*' matches 'encoder.proj.*' and 'decoder.proj.*'``), and hold them all."""
        by_module: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
        for name, rivals in ties:
            self._hold([name, *rivals])
            by_module[(nm.module_of(name), tuple(map(nm.module_of, rivals)))] += [name, *rivals]
        for (module, rival_modules), names in by_module.items():
            if len(names) == 1 + len(rival_modules):  # a single key: name it exactly
                name, rivals, verb = names[0], names[1:], f"{what} '{names[0]}' matches"
            else:
                name, rivals = f"{module}.*", [f"{m}.*" for m in rival_modules]
                verb = f"{what}s '{name}' match"
            self.unresolved.append(
                Unresolved(
                    names,
                    f"ambiguous: {verb} {_either(rivals)} equally well "
                    "(same common suffix, same shape); not guessed: add a map rule",
                )
            )

    # -- 2. fused projections ---------------------------------------------------------

    def fuse(self) -> None:
        """``qkv`` <-> ``q, k, v``: split where the target has the parts, merge where the
        checkpoint has them, when exactly one tensor's shape is their concatenation: under
        the parts' own parent, else anywhere in the same block (``attn.qkv`` against
        ``attention.q_proj``)."""
        extra, missing = self._unmatched()
        target_shape = {n: self.expected[n][0] for n in missing}
        source_shape = {n: self.table[n].shape for n in extra}
        for kind, parts, fused in (
            ("split", target_shape, source_shape),
            ("merge", source_shape, target_shape),
        ):
            instances: dict[tuple, list[tuple[str, str, str]]] = defaultdict(list)
            for (parent, leaf), modules in _qkv_triples(parts).items():
                found = self._fused_partner(parent, leaf, modules, parts, fused)
                if found is not None:
                    whole, sizes = found
                    key = (
                        nm.skeleton(_dotted(parent)),
                        nm.skeleton(_dotted(whole)),
                        modules,
                        sizes,
                    )
                    instances[key].append((parent, whole, leaf))
            for (_, _, modules, sizes), where in instances.items():
                self._fuse_rules(kind, modules, sizes, where)

    def _fused_partner(
        self,
        parent: str,
        leaf: str,
        modules: tuple[str, str, str],
        parts: dict[str, tuple[int, ...]],
        fused: dict[str, tuple[int, ...]],
    ) -> tuple[str, tuple[int, ...]] | None:
        """The one fused module (its path) near ``parent`` whose ``leaf`` is the parts'
        concatenation along dim 0, with the parts' sizes; several are reported."""
        shapes = [parts[_join(parent, m, leaf)] for m in modules]
        if len({s[1:] for s in shapes}) != 1 or any(not s for s in shapes):
            return None
        whole = (sum(s[0] for s in shapes), *shapes[0][1:])
        fitting = [
            name
            for name, shape in fused.items()
            if shape == whole and name.rsplit(".", 1)[-1] == leaf and "." in name
        ]
        block = nm.module_of(parent)
        partners = [n for n in fitting if nm.module_of(nm.module_of(n)) == parent]
        if not partners and parent:
            partners = [
                n
                for n in fitting
                if block
                in (nm.module_of(nm.module_of(n)), nm.module_of(nm.module_of(nm.module_of(n))))
            ]
        if not partners:
            return None
        names = [_join(parent, m, leaf) for m in modules]
        module = nm.module_of(partners[0]).rsplit(".", 1)[-1]
        if len(partners) > 1:
            reason = (
                f"ambiguous: {', '.join(names)} could be split from or merged into "
                f"{_either(partners)}; not guessed"
            )
        elif module in INTERLEAVED_FUSED:
            reason = (
                f"'{partners[0]}' fuses {', '.join(names)}, but '{module}' interleaves the "
                "heads (GPT-NeoX style), so a split by rows would scramble them; convert it "
                "by hand (reshape per head, then split)"
            )
        else:
            return nm.module_of(partners[0]), tuple(s[0] for s in shapes)
        self._hold([*names, *partners])
        self.unresolved.append(Unresolved([*names, *partners], reason))
        return None

    def _fuse_rules(
        self,
        kind: str,
        modules: tuple[str, str, str],
        sizes: tuple[int, ...],
        where: list[tuple[str, str, str]],
    ) -> None:
        """One split or merge for every (parts' parent, fused module, leaf) of one family,
        with layer indices generalised when both sides carry the same ones."""
        pairs = {(parent, whole) for parent, whole, _ in where}
        same_indices = all(nm.indices(_dotted(p)) == nm.indices(_dotted(w)) for p, w in pairs)
        if len(pairs) > 1 and not same_indices:
            for pair in sorted(pairs):
                self._fuse_rules(kind, modules, sizes, [i for i in where if i[:2] == pair])
            return
        parent, whole, _ = where[0]
        generalise = len(pairs) > 1
        groups = len(nm.indices(_dotted(parent))) if generalise else 0
        leaves = "(" + "|".join(re.escape(lf) for lf in sorted({lf for *_, lf in where})) + ")"
        parts_label = nm.glob(_dotted(parent), generalise=generalise)[:-1] if parent else ""
        whole_label = nm.glob(_dotted(whole), generalise=generalise)
        if kind == "split":
            out = nm.prefix_replacement(_dotted(parent), generalise=generalise)
            rule: Rule = {
                "op": "split",
                "pattern": nm.prefix_regex(_dotted(whole), generalise=generalise) + leaves + "$",
                "into": [out + m + rf".\g<{groups + 1}>" for m in modules],
                "dim": 0,
            }
            if len(set(sizes)) > 1:
                rule["sizes"] = list(sizes)
            summary = (
                f"'{whole_label}' is fused in the checkpoint; the target has "
                f"'{parts_label}{{{','.join(modules)}}}.*': split along dim 0 into "
                f"{list(sizes)} (rows taken to be q, k, v in that order)"
            )
        else:
            head = nm.prefix_regex(_dotted(parent), generalise=generalise) if parent else "^"
            rule = {
                "op": "merge",
                "pattern": head + "(" + "|".join(map(re.escape, modules)) + r")\." + leaves + "$",
                "group": groups + 1,
                "order": list(modules),
                "into": nm.prefix_replacement(_dotted(whole), generalise=generalise)
                + rf"\g<{groups + 2}>",
                "dim": 0,
            }
            summary = (
                f"'{parts_label}{{{','.join(modules)}}}.*' are separate in the checkpoint; "
                f"the target fuses them as '{whole_label}': merged along dim 0 in q, k, v order"
            )
        self._add(kind, rule, summary)

    # -- 3. shapes --------------------------------------------------------------------

    def shapes(self) -> None:
        """Same name, other shape: adapt a changed stem, else take the target's fresh values."""
        mismatched = [
            n
            for n, ref in self.table.items()
            if n in self.expected and ref.shape != self.expected[n][0] and not self._held(n)
        ]
        adapt: dict[int, list[str]] = defaultdict(list)
        fresh: list[str] = []
        for name in mismatched:
            old, new = self.table[name].shape, self.expected[name][0]
            stem = (
                len(old) >= 3
                and len(old) == len(new)
                and old[0] == new[0]
                and old[2:] == new[2:]
                and (old[1] == 3 or new[1] == 1)
            )
            (adapt[new[1]] if stem else fresh).append(name)
        for channels, names in adapt.items():
            groups = nm.cover(names, [n for n in self.table if n not in set(names)])
            before = sorted({self.table[n].shape[1] for n in names})
            self._add(
                "adapt",
                {
                    "op": "adapt_input_channels",
                    "pattern": nm.one_pattern(groups),
                    "channels": channels,
                },
                f"{nm.labels(groups)}: {'/'.join(map(str, before))} -> {channels} input channels "
                "(adapted as timm does: summed for 1, else repeated and rescaled by 3/N)",
            )
        if fresh:
            self._fresh(
                "reinit_mismatched", fresh, _shape_changes(self.table, self.expected, fresh)
            )

    def _fresh(self, op: str, names: list[str], why: str) -> None:
        """reinit_mismatched / fill_missing for ``names``: the model's own initialisation,
        or, with no model to ask (a checkpoint or manifest target), ``normal`` for weights
        of two or more dimensions, ``ones`` for what looks like a norm's scale or a running
        variance (zeros there would silence the layer), and ``zeros`` for the rest."""
        if self.target.model is not None:
            parts: list[tuple[list[str], str | None]] = [(names, None)]
        else:
            weights = [n for n in names if len(self.expected[n][0]) >= 2]
            scales = [n for n in names if n not in set(weights) and _ONES.search(n)]
            rest = [n for n in names if n not in {*weights, *scales}]
            parts = [(weights, "normal"), (scales, "ones"), (rest, "zeros")]
        universe = self.expected if op == "fill_missing" else self.table
        for chosen, init in parts:
            if not chosen:
                continue
            groups = nm.cover(chosen, [n for n in universe if n not in set(chosen)])
            rule: Rule = {"op": op, "pattern": nm.one_pattern(groups)}
            fresh = "fresh values, initialised as the target model initialises them"
            if init:
                rule["init"] = init
                fresh = f"fresh values, init {init} (no model to initialise from; edit to taste)"
            kind = "reinit" if op == "reinit_mismatched" else "fill"
            self._add(kind, rule, f"{why}: {fresh}")

    # -- 4. leftovers -----------------------------------------------------------------

    def leftovers(self) -> None:
        """Fill what only the target has, drop what only the checkpoint has, except what
        looks like a match the names do not show."""
        extra, missing = self._unmatched()
        if (extra or missing) and self._matched(self.table) == 0:
            self._hold([*extra, *missing])
            self.unresolved.append(
                Unresolved(
                    [],
                    "no checkpoint key corresponds to a target key by name, even after "
                    "trying every whole-segment prefix; nothing to build rules on",
                )
            )
            return
        self._hold_lookalikes(extra, missing)
        extra, missing = self._unmatched()
        for group in nm.cover(missing, [t for t in self.expected if t not in set(missing)]):
            self._fresh("fill_missing", list(group.names), _only_in_target(group, self.expected))
        if extra:
            self._drop(extra)
        self._dtype_note()

    def _hold_lookalikes(self, extra: list[str], missing: list[str]) -> None:
        """Leftovers that may be one tensor under two names are reported, not filled: a
        wholly unmatched target module whose tensors (leaf names and shapes) are exactly
        those of a wholly unmatched checkpoint module (``norm`` renamed ``ln``), and a
        target key with the shape of a checkpoint key, for shapes of two or more dimensions
        (``pos_embed`` and ``position_embeddings``), where a coincidence is unlikely."""
        self._hold_module_lookalikes(extra, missing)
        extra, missing = self._unmatched()
        by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for name in extra:
            shape = self.table[name].shape
            if len(shape) >= 2:
                by_shape[shape].append(name)
        for target in missing:
            shape = self.expected[target][0]
            alike = by_shape.get(shape, [])
            if alike:
                self._hold([target, *alike])
                self.unresolved.append(
                    Unresolved(
                        [target, *alike],
                        f"target key '{target}' {list(shape)} has no match by name, but "
                        f"{_either(alike[:3])} has its shape: renamed? Not guessed: add a map "
                        "rule (or drop and fill_missing explicitly)",
                    )
                )

    def _hold_module_lookalikes(self, extra: list[str], missing: list[str]) -> None:
        sources = _whole_modules(extra, self.table, {n: r.shape for n, r in self.table.items()})
        targets = _whole_modules(
            missing, self.expected, {n: s for n, (s, _) in self.expected.items()}
        )
        by_signature: dict[tuple, list[str]] = defaultdict(list)
        for module, (signature, _) in sources.items():
            by_signature[signature].append(module)
        skeleton = {m: nm.skeleton(m + ".") for m in [*sources, *targets]}
        # target family (blocks.#.norm.) -> its modules, and the look-alike checkpoint
        # modules by family
        families: dict[str, tuple[set[str], dict[str, set[str]]]] = {}
        for module, (signature, _) in targets.items():
            for alike in by_signature.get(signature, []):
                mine, theirs = families.setdefault(skeleton[module], (set(), defaultdict(set)))
                mine.add(module)
                theirs[skeleton[alike]].add(alike)
        for mine, theirs in families.values():
            names = [n for m in sorted(mine) for n in targets[m][1]]
            names += [n for group in theirs.values() for m in sorted(group) for n in sources[m][1]]
            self._hold(names)
            many = len(mine) > 1
            shown = nm.glob(min(mine) + ".", generalise=many)
            others = [nm.glob(min(g) + ".", generalise=len(g) > 1) for g in theirs.values()]
            self.unresolved.append(
                Unresolved(
                    names,
                    f"target module '{shown}'"
                    + (f" ({len(mine)} modules)" if many else "")
                    + " has no match by name, but checkpoint module "
                    + _either(others)
                    + (" hold" if len(others) > 1 else " holds")
                    + " the same tensors: renamed? Not guessed: add a rename rule (or drop "
                    "and fill_missing explicitly)",
                )
            )

    def _drop(self, extra: list[str]) -> None:
        """Drop rules on the checkpoint's own names for every key with no counterpart."""
        derived: dict[str, list[str]] = defaultdict(list)
        for name, ref in self.table.items():
            for source in ref.sources:
                derived[source].append(name)
        gone = set(extra)
        dropped = [s for s in self.source if derived.get(s) and set(derived[s]) <= gone]
        if not dropped:
            return
        groups = nm.cover(dropped, [s for s in self.source if s not in set(dropped)])
        if len(groups) > MAX_DROP_RULES:
            merged = nm.Group(
                nm.one_pattern(groups), nm.labels(groups[:6]) + ", ...", tuple(dropped)
            )
            groups = [merged]
        for group in groups:
            self.drops.append(
                Finding(
                    "drop",
                    f"{group.label}: absent from the target ({_drop_reason(group.names)})",
                    len(group.names),
                    {"op": "drop", "pattern": group.pattern},
                )
            )
        self.table = {n: r for n, r in self.table.items() if n not in gone}

    def _dtype_note(self) -> None:
        pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name, ref in self.table.items():
            if name in self.expected and ref.shape == self.expected[name][0]:
                want = self.expected[name][1]
                if ref.dtype != want:
                    pairs[(dtype_name(ref.dtype), dtype_name(want))].append(name)
        for (have, want), names in pairs.items():
            self.notes.append(
                Finding(
                    "dtype",
                    f"{group_names(names, 4)}: {have} in the checkpoint, {want} in the target; "
                    "load_state_dict casts them (a cast rule or output.dtype changes the file)",
                    len(names),
                )
            )


def _qkv_triples(shapes: dict[str, tuple[int, ...]]) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(parent, leaf) -> the (q, k, v) module names under ``parent`` holding ``leaf``, for
    parents where each role is named by exactly one module (``q_proj``, ``key``, ``wv``)."""
    roles: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in shapes:
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        role = nm.role(module) if module_path else None
        if role:
            roles[(parent, leaf)][role].append(module)
    return {
        key: (found["q"][0], found["k"][0], found["v"][0])
        for key, found in roles.items()
        if set(found) == {"q", "k", "v"} and all(len(m) == 1 for m in found.values())
    }


def _whole_modules(
    names: list[str], universe: Collection[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[tuple[tuple[str, tuple[int, ...]], ...], list[str]]]:
    """Modules all of whose own tensors are among ``names``: module -> (signature, keys),
    the signature being its sorted (leaf, shape) pairs."""
    chosen = set(names)
    members: dict[str, list[str]] = defaultdict(list)
    for name in universe:
        members[nm.module_of(name)].append(name)
    return {
        module: (tuple(sorted((n.rsplit(".", 1)[-1], shapes[n]) for n in keys)), keys)
        for module, keys in members.items()
        if module and chosen.issuperset(keys)
    }


def _shape_changes(table: Table, expected: dict, names: list[str]) -> str:
    """``fc.*: 1000 -> 10 along dim 0`` per module, for the keys whose shapes differ."""
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_module[nm.module_of(name)].append(name)
    parts = []
    for module, keys in by_module.items():
        label = f"{module}.*" if module else ", ".join(keys)
        changes = {
            (d, a, b)
            for n in keys
            for d, (a, b) in enumerate(zip(table[n].shape, expected[n][0], strict=False))
            if a != b and len(table[n].shape) == len(expected[n][0])
        }
        same_rank = all(len(table[n].shape) == len(expected[n][0]) for n in keys)
        if same_rank and len(changes) == 1:
            ((d, a, b),) = changes
            parts.append(f"{label}: {a} -> {b} along dim {d}")
        else:
            parts.append(
                f"{label}: "
                + ", ".join(f"{list(table[n].shape)} -> {list(expected[n][0])}" for n in keys[:3])
            )
    return "; ".join(parts[:4]) + (
        f"; ... ({len(parts) - 4} more modules)" if len(parts) > 4 else ""
    )


def _only_in_target(group: nm.Group, expected: dict) -> str:
    params = sum(math.prod(expected[n][0]) for n in group.names)
    if all(n.endswith("num_batches_tracked") for n in group.names):
        what = "BatchNorm step counters the checkpoint lacks (FrozenBatchNorm2d does not save them)"
    else:
        what = f"only the target has them ({params:,} values)"
    return f"{group.label}: {what}"


def plural(n: int, word: str) -> str:
    """``plural(1, "key")`` -> ``"1 key"``; ``plural(2, "key")`` -> ``"2 keys"``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _drop_reason(names: Collection[str]) -> str:
    if all(nm.mentions_ema(n.rpartition(".")[0] + ".") for n in names):
        return "an EMA copy; the raw weights are used"
    if all(n.rsplit(".", 1)[-1] in NON_PERSISTENT_HINTS for n in names):
        return "buffers the target does not save: non-persistent there"
    return "no counterpart"


def _either(names: list[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _dotted(parent: str) -> str:
    """A module path as a prefix: ``"blocks.0.attn"`` -> ``"blocks.0.attn."``."""
    return parent + "." if parent else ""
