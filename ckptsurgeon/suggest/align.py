"""Step 1 of the inference: align names by rewriting whole-segment prefixes.

Most ``Missing key(s) ... Unexpected key(s)`` walls are one prefix wrong everywhere (a
``module.`` from DataParallel, a ``bert.`` the target adds, ``blocks.N.`` against
``layers.N.``), so prefixes are tried first and the keys they settle never reach the later
steps. Every (checkpoint prefix, target prefix) pair that turns an unmatched checkpoint key
into an unmatched target key is a candidate; the best is run and the search repeated, since
one rewrite can expose the next. The ranking (keys matched, shapes agreeing, raw before EMA,
fewest segments rewritten) follows detectron2's ``align_and_update_state_dicts``. Equally
good candidates that disagree are reported and their keys held, never guessed between,
because a wrong guess would load trained weights into the wrong layer without any error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from ckptsurgeon.errors import FitError
from ckptsurgeon.suggest import names as nm
from ckptsurgeon.suggest.state import Finding, Rule, State, Unresolved, either

CandidateKey = tuple[str, str, bool]  # (checkpoint prefix, target prefix, indices generalised)
Rank = tuple[int, int, bool, int]


def align(state: State) -> None:
    """Prefix rewrites, best first, until none matches another key."""
    while True:
        candidates = _candidates(state)
        if not candidates:
            return
        best = max(candidates.values(), key=_Candidate.rank)
        if len(best.mapping) == 1:
            _align_singles(state, list(candidates.values()))
            return
        rivals = [
            c
            for c in candidates.values()
            if c is not best and c.rank() == best.rank() and best.conflicts(c)
        ]
        if rivals:
            _ambiguous(state, [best, *rivals])
            continue
        rule, kind, summary = _prefix_rule(state, best)
        try:
            table, matched = state.run(rule)
        except FitError:
            table, matched = state.table, 0
        if state.matched(table) <= state.matched(state.table):
            state.banned.add(best.key)
            continue
        state.table = table
        state.findings.append(Finding(kind, summary, matched, rule))


@dataclass
class _Candidate:
    """A prefix rewrite and the checkpoint keys it would turn into target keys."""

    key: CandidateKey
    mapping: dict[str, str] = field(default_factory=dict)  # checkpoint key -> target key
    heads: set[tuple[str, str]] = field(default_factory=set)  # concrete prefix pairs
    shape_ok: int = 0

    def rank(self) -> Rank:
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


def _candidate_key(head: str, t_head: str) -> CandidateKey:
    """Pairs that carry the same layer indices (``blocks.3.`` -> ``layers.3.``) share one
    candidate with the indices generalised; any other pair is its own literal candidate."""
    found = nm.indices(head)
    if found and found == nm.indices(t_head):
        return nm.skeleton(head), nm.skeleton(t_head), True
    return head, t_head, False


def _candidates(state: State) -> dict[CandidateKey, _Candidate]:
    """Every prefix rewrite that turns an unmatched key into an unmatched target key."""
    extra, missing = state.unmatched()
    heads_by_rest: dict[str, list[str]] = defaultdict(list)
    for name in missing:
        for t_head, rest in nm.split_prefixes(name):
            heads_by_rest[rest].append(t_head)
    whole = set(missing)
    found: dict[CandidateKey, _Candidate] = {}
    for name in extra:
        shape = state.table[name].shape
        for head, rest in nm.split_prefixes(name):
            if head and "." not in rest:
                # A rename must keep a module and a leaf in common, so a bare leaf
                # ("weight", shared by half the model) only pairs with a whole name.
                t_heads: Iterable[str] = ("",) if rest in whole else ()
            else:
                t_heads = heads_by_rest.get(rest, ())
            for t_head in t_heads:
                key = _candidate_key(head, t_head)
                if key in state.banned:
                    continue
                candidate = found.setdefault(key, _Candidate(key))
                candidate.mapping[name] = t_head + rest
                candidate.heads.add((head, t_head))
                candidate.shape_ok += state.expected[t_head + rest][0] == shape
    return {k: c for k, c in found.items() if c.shape_ok}


def _prefix_rule(state: State, candidate: _Candidate) -> tuple[Rule, str, str]:
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
        carrying = sum(1 for name in state.table if name.startswith(head))
        summary = (
            f"every checkpoint key carries '{head}'"
            if carrying == len(state.table)
            else f"{carrying} of the {len(state.table)} checkpoint keys carry '{head}', "
            "which the target's names lack"
        )
        return {"op": "strip_prefix", "prefix": head}, "strip_prefix", summary
    if not head:
        rule: Rule = {"op": "add_prefix", "prefix": t_head}
        keep = [n for n in state.table if n in state.expected]  # already right: untouched
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


def _align_singles(state: State, candidates: list[_Candidate]) -> None:
    """One key per candidate: each checkpoint key goes to its best-ranked target key
    (longest common dotted suffix, same shape), as detectron2 matches; a tie for a
    checkpoint key, or two checkpoint keys for one target key, is reported."""
    options: dict[str, dict[str, Rank]] = defaultdict(dict)
    for candidate in candidates:
        ((source, target),) = candidate.mapping.items()
        if state.table[source].shape != state.expected[target][0]:
            continue  # a single key is matched only with shape agreement
        rank = candidate.rank()
        options[source][target] = max(rank, options[source].get(target, rank))
    chosen: dict[str, list[tuple[Rank, str]]] = defaultdict(list)
    for source, targets in options.items():
        top = max(targets.values())
        best = sorted(t for t, r in targets.items() if r == top)
        if len(best) > 1:
            _report_ties(state, [(source, best)], "checkpoint key")
        else:
            chosen[best[0]].append((top, source))
    mapping: dict[str, str] = {}
    for target, claims in chosen.items():
        top = max(rank for rank, _ in claims)
        best = sorted(s for rank, s in claims if rank == top)
        if len(best) > 1:
            _report_ties(state, [(target, best)], "target key")
        else:
            mapping[best[0]] = target
    if mapping:
        shown = ", ".join(f"{s} -> {t}" for s, t in sorted(mapping.items())[:3])
        state.add(
            "map",
            {"op": "map", "mapping": dict(sorted(mapping.items()))},
            f"renamed ({shown}{', ...' if len(mapping) > 3 else ''}): each matches one "
            "target key by its longest common dotted suffix, with the same shape",
        )


def _ambiguous(state: State, group: list[_Candidate]) -> None:
    """Equally good prefix rewrites that disagree: report each disputed key, hold it
    out of every later rule, and never use these rewrites."""
    targets_of: dict[str, set[str]] = defaultdict(set)
    sources_of: dict[str, set[str]] = defaultdict(set)
    for candidate in group:
        state.banned.add(candidate.key)
        for source, target in candidate.mapping.items():
            targets_of[source].add(target)
            sources_of[target].add(source)
    _report_ties(
        state, [(s, sorted(ts)) for s, ts in targets_of.items() if len(ts) > 1], "checkpoint key"
    )
    _report_ties(
        state, [(t, sorted(ss)) for t, ss in sources_of.items() if len(ss) > 1], "target key"
    )


def _report_ties(state: State, ties: list[tuple[str, list[str]]], what: str) -> None:
    """Report keys that match several rivals equally well, one line per module
    (``'proj.*' matches 'encoder.proj.*' and 'decoder.proj.*'``), and hold them all."""
    by_module: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for name, rivals in ties:
        state.hold([name, *rivals])
        by_module[(nm.module_of(name), tuple(map(nm.module_of, rivals)))] += [name, *rivals]
    for (module, rival_modules), names in by_module.items():
        if len(names) == 1 + len(rival_modules):  # a single key: name it exactly
            name, rivals, verb = names[0], names[1:], f"{what} '{names[0]}' matches"
        else:
            name, rivals = f"{module}.*", [f"{m}.*" for m in rival_modules]
            verb = f"{what}s '{name}' match"
        state.unresolved.append(
            Unresolved(
                names,
                f"ambiguous: {verb} {either(rivals)} equally well "
                "(same common suffix, same shape); not guessed: add a map rule",
            )
        )
