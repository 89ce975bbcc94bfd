"""``strategy:`` presets: the transfer-learning decision table, expanded into freeze + phases.

The table (little/much data x similar/different domain) and what each case does:

==========================  ============  ==================================================
case                        strategy      expansion (E = ``epochs``, lr = ``lr``)
==========================  ============  ==================================================
little data, similar        ``head_only``  backbone frozen for all E epochs; the head at lr
little data, different      ``partial``    head warm-up (W epochs, backbone frozen), then the
                                           backbone's upper blocks train with the head
                                           (E - W epochs, backbone LR x ``PARTIAL_SCALE``);
                                           the first ``freeze_depth`` blocks stay frozen
much data, similar          ``full``       head warm-up (W epochs), then everything
                                           (E - W epochs, backbone LR x ``FULL_SCALE``)
much data, different        ``scratch``    the pretrained weights are not used: the model is
                                           freshly initialised and everything trains at lr
                                           for E epochs
==========================  ============  ==================================================

W = ``round(E * WARMUP_FRACTION)``, at least 1 (none when E is 1). Every phase uses a cosine
schedule. ``auto`` measures the case (:mod:`ckptsurgeon.finetune.probe`) and picks one
(``scratch`` rather than ``partial`` when the pretrained features are no better than
untrained ones).

The expansions are written in the model's layout (:mod:`ckptsurgeon.finetune.layout`: the
head, and the backbone cut into blocks from the input). A block is named by its module path
(``^name$`` for a parameter of the model itself), so an expansion is an ordinary
``freeze:`` + ``phases:`` that could be pasted into a rules file; ``--dry-run`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ckptsurgeon.errors import UsageError
from ckptsurgeon.finetune import probe
from ckptsurgeon.finetune.layout import CASES, Layout, default_depth, layout
from ckptsurgeon.rules.finetune import FinetuneSpec, FreezeSpec, PhaseSpec

# The head's warm-up share of the epochs, for partial and full: a freshly initialised head
# sends large, random gradients into the backbone; a short frozen phase first lets it settle
# (the guide's "train the new part, then unfreeze" recipe). A fifth keeps most of the budget
# for the phase that adapts the backbone.
WARMUP_FRACTION = 0.2
# full: the classic fine-tuning LR, ten times smaller for the pretrained layers than for
# the new head, so the features are adjusted, not overwritten.
FULL_SCALE = 0.1
# partial: the upper blocks are re-trained for the new domain (the guide: "retrain the
# higher layers"), so they take the head's full LR; the frozen lower blocks keep the
# general features that little data could not learn again.
PARTIAL_SCALE = 1.0
SCHEDULE = "cosine"


def phase_dict(p: PhaseSpec) -> dict[str, Any]:
    """A phase as data: what differs from the defaults, but always whether it is frozen and,
    where the backbone trains, its LR scale (the two things a reader looks for)."""
    rest = p.model_dump(exclude_defaults=True)
    out: dict[str, Any] = {"epochs": p.epochs, "frozen": p.frozen, **rest}
    if not p.frozen or p.unfreeze:
        out["backbone_lr_scale"] = p.backbone_lr_scale
    return out


def _freeze_for(lay: Layout, train_bn: bool) -> FreezeSpec:
    modules = [b for b in lay.blocks if not b.startswith("^")]
    patterns = [b for b in lay.blocks if b.startswith("^")]
    return FreezeSpec.model_validate({
        "modules": modules, "patterns": patterns, "except": lay.head, "train_bn": train_bn,
    })  # fmt: skip


def warmup_epochs(epochs: int) -> int:
    """The head warm-up phase's epochs out of ``epochs`` (0 when there is only one)."""
    return 0 if epochs < 2 else max(1, round(epochs * WARMUP_FRACTION))


@dataclass
class Expansion:
    """What a strategy becomes: the freeze and phases the runner trains, and whether the
    model is re-initialised first (scratch)."""

    strategy: str
    freeze: FreezeSpec
    phases: list[PhaseSpec]
    reinitialise: bool = False
    freeze_depth: int | None = None
    blocks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "reinitialise": self.reinitialise,
            "freeze": self.freeze.model_dump(by_alias=True, exclude_defaults=True),
            "phases": [phase_dict(p) for p in self.phases],
        }
        if self.freeze_depth is not None:
            out["freeze_depth"] = self.freeze_depth
            out["frozen_blocks"] = self.blocks[: self.freeze_depth]
        return out

    def spec(self, base: FinetuneSpec) -> FinetuneSpec:
        """``base`` with this freeze and these phases (its strategy kept, for the record)."""
        return base.model_copy(update={"freeze": self.freeze, "phases": self.phases})


def expand(
    strategy: str,
    epochs: int,
    lr: float,
    lay: Layout,
    *,
    freeze_depth: int | None = None,
    train_bn: bool = False,
) -> Expansion:
    """The freeze and phases of a fixed strategy (not ``auto``) for a budget of ``epochs``
    epochs and head LR ``lr`` on a model laid out as ``lay``. Pure: the same arguments give
    the same expansion, which is what lets a resumed run re-derive it."""
    warm = warmup_epochs(epochs)

    def phase(n: int, **kw: Any) -> PhaseSpec:
        return PhaseSpec.model_validate({"epochs": n, "lr": lr, "schedule": SCHEDULE, **kw})

    if strategy == "scratch":
        freeze = FreezeSpec.model_validate({"train_bn": train_bn})
        return Expansion(strategy, freeze, [phase(epochs, frozen=False)], reinitialise=True)
    freeze = _freeze_for(lay, train_bn)
    if strategy == "head_only" or not lay.blocks:
        return Expansion(strategy, freeze, [phase(epochs, frozen=True)], blocks=lay.blocks)
    head_first = [phase(warm, frozen=True)] if warm else []
    if strategy == "full":
        main = phase(epochs - warm, frozen=False, backbone_lr_scale=FULL_SCALE)
        return Expansion(strategy, freeze, [*head_first, main], blocks=lay.blocks)
    if strategy != "partial":
        raise ValueError(f"not a fixed strategy: {strategy!r}")
    depth = default_depth(len(lay.blocks)) if freeze_depth is None else freeze_depth
    if depth >= len(lay.blocks):
        raise UsageError(
            f"freeze_depth: {depth}, but the backbone has {len(lay.blocks)} blocks "
            f"({', '.join(lay.blocks)}); at most {len(lay.blocks) - 1} (all of them frozen "
            "is strategy: head_only)"
        )
    main = phase(
        epochs - warm,
        frozen=True,
        unfreeze=lay.blocks[depth:],
        backbone_lr_scale=PARTIAL_SCALE,
    )
    return Expansion(strategy, freeze, [*head_first, main], freeze_depth=depth, blocks=lay.blocks)


def expand_spec(spec: FinetuneSpec, model: nn.Module, strategy: str, depth: int | None = None):
    """:func:`expand` for ``spec``'s budget on ``model``; ``strategy`` replaces ``auto``."""
    assert spec.epochs is not None and spec.lr is not None  # the rules validate it
    return expand(
        strategy,
        spec.epochs,
        spec.lr,
        layout(model, spec.freeze),
        freeze_depth=spec.freeze_depth if depth is None else depth,
        train_bn=spec.freeze.train_bn,
    )


def plan(spec: FinetuneSpec, model: nn.Module) -> dict[str, Any]:
    """What ``--dry-run`` shows: the freeze and phases a run will train, as data.

    For ``auto``, what it measures and every case's expansion (the measurement needs the
    weights and the data, so the choice is made when the run starts)."""
    if spec.strategy is None:
        return {
            "strategy": None,
            "freeze": spec.freeze.model_dump(by_alias=True, exclude_defaults=True),
            "phases": [phase_dict(p) for p in spec.phases],
        }
    lay = layout(model, spec.freeze)
    if spec.strategy != "auto":
        return {**expand_spec(spec, model, spec.strategy).to_dict(), "layout": lay.to_dict()}
    return {
        "strategy": "auto",
        "layout": lay.to_dict(),
        "measures": probe.describe(),
        "cases": {
            f"{data} data, {domain} domain": expand_spec(spec, model, name).to_dict()
            for (data, domain), name in CASES.items()
        },
    }


def format_plan(p: dict[str, Any]) -> str:
    """:func:`plan` as text: a comment line, then YAML one could paste into a rules file."""
    import yaml

    def dump(value: Any) -> str:
        return yaml.safe_dump(value, sort_keys=False, default_flow_style=None, width=100)

    if p["strategy"] is None:
        return "finetune: freeze and phases as given\n" + dump(
            {"freeze": p["freeze"], "phases": p["phases"]}
        )
    head = f"head: {', '.join(p['layout']['head'])}; backbone blocks: " + (
        ", ".join(p["layout"]["blocks"]) or "none"
    )
    if p["strategy"] != "auto":
        return f"finetune strategy: {p['strategy']} ({head})\n" + _dump_expansion(p, dump)
    lines = [
        f"finetune strategy: auto ({head})",
        f"# measured when the run starts: {p['measures']}",
    ]
    for case, expansion in p["cases"].items():
        lines.append(f"# if {case}: {expansion['strategy']}")
        lines.append(_dump_expansion(expansion, dump).rstrip())
    return "\n".join(lines) + "\n"


def _dump_expansion(e: dict[str, Any], dump: Any) -> str:
    body: dict[str, Any] = {}
    if e["reinitialise"]:
        body["reinitialise"] = "the pretrained weights are not used"
    if "freeze_depth" in e:
        body["frozen_blocks"] = e["frozen_blocks"]
    body["freeze"] = e["freeze"]
    body["phases"] = e["phases"]
    return dump(body)
