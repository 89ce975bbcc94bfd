"""``strategy: auto``: measure which case of the decision table a fine-tune is in.

Two numbers decide it, both from the training set only (the validation set is never
looked at, so the choice cannot be fitted to what the run is scored on):

* **data**: examples per class, the median over the classes (one rare class should not
  make a large set "little").
* **domain**: how well the pretrained features already separate the new classes. A part
  of the training set (``PROBE_HOLDOUT``, per class) is held out; one forward pass of the
  rest and the held-out part through the model, in eval mode and without gradients,
  records the outputs of the backbone's last ``PROBE_BLOCKS`` blocks (spatial and token
  dimensions averaged away) and the head's input; a linear probe (a ridge-regression
  classifier, fitted in closed form) fits each on the fitting part and is scored on the
  held-out part. The score is chance-corrected: ``(accuracy - 1/classes) / (1 - 1/classes)``, 0 for
  guessing and 1 for perfect, so that it reads the same for 2 classes or 100.

The head's input decides *similar*: it is exactly what ``head_only`` would train on. For
``partial``, the freeze depth is the probed block that separates best: it and everything
below it stay frozen, the blocks above it are re-trained (the last block always is).

One more measurement, in the little-data, different-domain case only: the same probe on
the same network freshly initialised. ``partial`` keeps the lower blocks for what they
learned; when no depth of the pretrained model separates the classes better than the
untrained network does, they learned nothing that helps here, and ``auto`` picks
``scratch`` instead (the table's "the pretrained model will not help" case; on the
benchmark's pixel-statistics textures, scratch beats partial at 20 examples per class).

The thresholds are heuristics, not laws: where "little" data ends depends on the model's
size and the task, and a linear probe is a proxy for what fine-tuning can do. The values
below were set on ``benchmarks/bench_finetune.py strategies`` (a small CNN, 5-class tasks);
the README shows how they fare there. Set ``strategy:`` explicitly where you know better.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ckptsurgeon.finetune.features import common_prefix
from ckptsurgeon.finetune.freeze import under
from ckptsurgeon.finetune.layout import CASES, Layout, default_depth
from ckptsurgeon.finetune.outputs import model_output, to_device

# Fewer examples per class than this is "little data". Below about a hundred examples a
# class, fine-tuning a whole backbone overfits more than it adapts in the common guides'
# experience; the benchmark's two sizes (20 and 300 a class) sit well either side.
LITTLE_DATA_PER_CLASS = 100
# A chance-corrected probe score of the head's input at least this high is a "similar"
# domain: the frozen features already separate the new classes well. The benchmark's
# similar tasks score about 0.9-0.96 and its different ones below 0.35; 0.75 sits between,
# nearer the top, because a probe on features of the source task separates a *related*
# but different task moderately well without the features being right for it.
SIMILAR_SEPARABILITY = 0.75
PROBE_BLOCKS = 4  # the last blocks of the backbone probed for partial's freeze depth
PROBE_HOLDOUT = 0.3  # the share of each class held out to score the probe
MIN_PER_CLASS = 4  # below this in any class there is no meaningful held-out part
PROBE_MAX_PER_CLASS = 200  # the probe uses at most this many examples a class: enough
# to score it, and a large training set costs no more to measure than a middling one
PROBE_RIDGE = 1.0  # the probe's L2 penalty, scikit-learn's RidgeClassifier default
FALLBACK = "head_only"  # too little data to measure: the fewest parameters to fit


def describe() -> str:
    """One line on what ``auto`` measures and how it decides (for ``--dry-run``)."""
    return (
        f"examples per class (median; < {LITTLE_DATA_PER_CLASS} is little data) and a "
        f"linear probe of the frozen features on {PROBE_HOLDOUT:.0%} of train held out "
        f"(head input, chance-corrected >= {SIMILAR_SEPARABILITY} is a similar domain; "
        f"the best of the last {PROBE_BLOCKS} blocks sets partial's depth; partial becomes "
        f"scratch when the untrained network's features separate as well); fewer than "
        f"{MIN_PER_CLASS} examples in a class: {FALLBACK}"
    )


@dataclass
class Choice:
    """What ``auto`` chose, and every number behind it (``summary.json``'s ``strategy``)."""

    strategy: str
    freeze_depth: int | None
    reason: str
    case: str | None = None
    fallback: str | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.strategy,
            "freeze_depth": self.freeze_depth,
            "case": self.case,
            "reason": self.reason,
            "fallback": self.fallback,
            "measurements": self.measurements,
            "measure_seconds": round(self.seconds, 4),
            "thresholds": {
                "little_data_per_class": LITTLE_DATA_PER_CLASS,
                "similar_separability": SIMILAR_SEPARABILITY,
            },
        }


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The training labels: a tensor file's target, an ImageFolder's ``targets``, else
    read sample by sample (which costs a pass over the data)."""
    for attr in ("target", "targets"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return torch.as_tensor(value).long().flatten()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def split(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, a random ``PROBE_HOLDOUT`` share held out (at least one example) and the
    rest to fit, ``PROBE_MAX_PER_CLASS`` at most in all; a fixed draw for ``seed``."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    fit, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)][:PROBE_MAX_PER_CLASS]
        n_held = max(1, round(len(idx) * PROBE_HOLDOUT))
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit), torch.cat(held)


def pool(t: torch.Tensor) -> torch.Tensor:
    """One vector per sample: images (N, C, H, W) averaged over H and W, token sequences
    (N, T, D) over T, anything else flattened."""
    if t.ndim == 4:
        return t.float().mean(dim=(2, 3))
    if t.ndim == 3:
        return t.float().mean(dim=1)
    return t.float().reshape(len(t), -1)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("last_hidden_state", "hidden_states"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def head_module(model: nn.Module, lay: Layout) -> nn.Module | None:
    """The module holding the head's parameters, when one does."""
    rx = [re.compile(h) for h in lay.head]
    names = [n for n, _ in model.named_parameters() if any(r.search(n) for r in rx)]
    path = common_prefix(names) if names else ""
    if not path:
        return None
    every = [n for n, _ in model.named_parameters() if under(n, path)]
    return model.get_submodule(path) if set(every) == set(names) else None


@torch.no_grad()
def capture(
    model: nn.Module,
    dataset: Dataset,
    modules: dict[str, nn.Module],
    head: nn.Module | None,
    batch_size: int,
    rt: Any,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass over ``dataset`` in eval mode: each module's output, and the
    head's input under ``"head input"``, pooled, on the CPU; and the labels."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = []

    def keep(name: str):
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is not None:
                got[name].append(pool(t.detach()).cpu())

        return hook

    for name, module in modules.items():
        hooks.append(module.register_forward_hook(keep(name)))
    if head is not None:
        got["head input"] = []

        def head_in(_m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                got["head input"].append(pool(args[0].detach()).cpu())

        hooks.append(head.register_forward_pre_hook(head_in))
    was_training = model.training
    model.eval()
    labels = []
    try:
        for inputs, target in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            with rt.autocast():
                model_output(model, to_device(inputs, rt.device))
            labels.append(torch.as_tensor(target).long())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    batches = len(labels)
    out = {k: torch.cat(v) for k, v in got.items() if len(v) == batches and batches}
    return out, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def linear_probe(
    x_fit: torch.Tensor, y_fit: torch.Tensor, x_held: torch.Tensor, y_held: torch.Tensor
) -> float:
    """Held-out accuracy of a ridge-regression classifier (scikit-learn's RidgeClassifier:
    least squares onto +-1 class codes, L2 ``PROBE_RIDGE``) on standardised features.

    A linear head fitted in closed form: one linear solve, no iterations to tune, the same
    answer every time, and no optimizer (the first ``torch.optim`` step imports the
    compiler stack, seconds that belong to the training, not to the measurement)."""
    classes = int(torch.cat([y_fit, y_held]).max()) + 1
    mean, std = x_fit.mean(0), x_fit.std(0, unbiased=False).clamp_min(1e-6)
    a = ((x_fit - mean) / std).double()
    b = ((x_held - mean) / std).double()
    codes = -torch.ones(len(a), classes, dtype=torch.float64)
    codes[torch.arange(len(a)), y_fit] = 1.0
    intercept = codes.mean(0)  # unpenalised, as scikit-learn fits it (features centred)
    codes -= intercept
    ridge = PROBE_RIDGE * torch.eye(min(a.shape), dtype=torch.float64)
    if a.shape[0] < a.shape[1]:  # fewer samples than features: the dual form is smaller
        w = a.T @ torch.linalg.solve(a @ a.T + ridge, codes)
    else:
        w = torch.linalg.solve(a.T @ a + ridge, a.T @ codes)
    return float(((b @ w + intercept).argmax(1) == y_held).double().mean())


def separability(accuracy: float, classes: int) -> float:
    """Chance-corrected accuracy: 0 for guessing among ``classes``, 1 for perfect."""
    chance = 1.0 / max(classes, 2)
    return (accuracy - chance) / (1 - chance)


def measure(
    model: nn.Module,
    train_set: Dataset,
    lay: Layout,
    spec: Any,
    rt: Any,
    untrained: Callable[[], nn.Module] | None = None,
) -> Choice:
    """Measure the training set and the features, and choose (see the module docstring).

    ``untrained`` builds the same architecture freshly initialised, on ``rt``'s device; it
    is called only in the little-data, different-domain case, to tell whether the
    pretrained weights help at all (None: that comparison is skipped)."""
    t0 = time.perf_counter()
    choice = _measure(model, train_set, lay, spec, rt, untrained)
    choice.seconds = time.perf_counter() - t0
    return choice


def probe_scores(
    model: nn.Module,
    train_set: Dataset,
    lay: Layout,
    fit: torch.Tensor,
    held: torch.Tensor,
    spec: Any,
    rt: Any,
) -> list[dict[str, Any]]:
    """The linear probe of ``model``'s features at each probed depth (the last
    ``PROBE_BLOCKS`` blocks and the head's input): fitted on ``fit``, scored on ``held``."""
    probed = [b for b in lay.blocks if not b.startswith("^")][-PROBE_BLOCKS:]
    modules = {b: model.get_submodule(b) for b in probed}
    order = torch.cat([fit, held])
    feats, ys = capture(
        model, Subset(train_set, order.tolist()), modules, head_module(model, lay),
        spec.batch_size, rt,
    )  # fmt: skip
    # The labels may not be 0..C-1 (a subset of classes): index them densely for the probe.
    dense = {int(c): i for i, c in enumerate(torch.unique(ys))}
    ys = torch.tensor([dense[int(v)] for v in ys], dtype=torch.long)
    n_fit, classes = len(fit), len(dense)
    scores: list[dict[str, Any]] = []
    for name, x in feats.items():
        acc = linear_probe(x[:n_fit], ys[:n_fit], x[n_fit:], ys[n_fit:])
        scores.append({
            "depth": name, "dim": x.shape[1], "accuracy": round(acc, 4),
            "separability": round(separability(acc, classes), 4),
        })  # fmt: skip
    return scores


def _measure(
    model: nn.Module,
    train_set: Dataset,
    lay: Layout,
    spec: Any,
    rt: Any,
    untrained: Callable[[], nn.Module] | None,
) -> Choice:
    labels = labels_of(train_set)
    counts = torch.bincount(labels) if len(labels) else torch.zeros(0, dtype=torch.long)
    present = [int(c) for c in counts if c > 0]
    m: dict[str, Any] = {
        "examples": len(labels),
        "classes": len(present),
        "examples_per_class_median": statistics.median(present) if present else 0,
        "examples_per_class_min": min(present, default=0),
    }
    if len(present) < 2 or min(present) < MIN_PER_CLASS:
        why = (
            f"the training set has {m['examples_per_class_min']} examples in its smallest "
            f"class, too few to hold out a probe split (auto needs {MIN_PER_CLASS} a class)"
            if len(present) >= 2
            else "the training set has fewer than two classes: there is nothing to probe"
        )
        return Choice(
            FALLBACK, None, f"{why}: falling back to {FALLBACK}", fallback=why, measurements=m
        )
    fit, held = split(labels, spec.seed)
    scores = probe_scores(model, train_set, lay, fit, held, spec, rt)
    m.update(probe_fit=len(fit), probe_held_out=len(held), probe=scores)
    if not scores:
        why = "no probed module produced a tensor output"
        return Choice(
            FALLBACK, None, f"{why}: falling back to {FALLBACK}", fallback=why, measurements=m
        )
    top = next((s for s in scores if s["depth"] == "head input"), scores[-1])
    little = m["examples_per_class_median"] < LITTLE_DATA_PER_CLASS
    similar = top["separability"] >= SIMILAR_SEPARABILITY
    data, domain = ("little" if little else "much"), ("similar" if similar else "different")
    strategy = CASES[(data, domain)]
    reason = (
        f"{m['examples_per_class_median']:g} examples per class (median) "
        f"{'<' if little else '>='} {LITTLE_DATA_PER_CLASS}: {data} data; the frozen "
        f"features ({top['depth']}) separate the classes at {top['separability']:.2f} "
        f"(chance-corrected probe accuracy) {'>=' if similar else '<'} "
        f"{SIMILAR_SEPARABILITY}: {domain} domain -> {strategy}"
    )
    if strategy == "partial" and untrained is not None:
        baseline = probe_scores(untrained(), train_set, lay, fit, held, spec, rt)
        m["untrained_probe"] = baseline
        best = max(s["separability"] for s in scores)
        best_untrained = max((s["separability"] for s in baseline), default=-math.inf)
        if best <= best_untrained:
            # partial keeps the lower blocks for what they already know; when no depth of
            # the pretrained model separates the classes better than the same network
            # untrained, they know nothing useful here and re-learning everything is
            # cheaper than un-learning it (the guide's scratch argument).
            strategy = "scratch"
            reason += (
                f", but no pretrained depth separates better than the untrained network "
                f"({best:.2f} <= {best_untrained:.2f}): the pretrained weights carry "
                "nothing for this task -> scratch"
            )
    depth = None
    if strategy == "partial":
        depth, why_depth = _partial_depth(lay, scores)
        reason += f" ({why_depth})"
    return Choice(strategy, depth, reason, case=f"{data} data, {domain} domain", measurements=m)


def _partial_depth(lay: Layout, scores: list[dict[str, Any]]) -> tuple[int, str]:
    """The frozen blocks for partial: up to the probed block that separates best (the
    deeper one on a tie), leaving at least the last block to train."""
    n = len(lay.blocks)
    by_name = {s["depth"]: s["separability"] for s in scores}
    ranked = [(by_name[b], i, b) for i, b in enumerate(lay.blocks) if b in by_name]
    if not ranked:
        depth = default_depth(n)
        return depth, f"no block could be probed: the default depth, {depth} of {n} blocks frozen"
    best, index, block = max(ranked)
    depth = min(index + 1, max(n - 1, 0))
    return depth, f"block {block} separates best ({best:.2f}): {depth} of {n} blocks stay frozen"


def fraction(measure_seconds: float, run_seconds: float) -> float:
    """The measurement's share of the whole run's wall time."""
    return round(measure_seconds / run_seconds, 4) if run_seconds > 0 else math.nan
