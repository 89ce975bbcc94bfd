"""The fine-tune recipe, top to bottom: freeze, build the optimizer per phase, train, resume.

:func:`run_finetune` reads as the recipe: :func:`make_runtime` (device, process group),
:func:`setup` (datasets, backbone), :func:`resume_from` under ``--resume``,
:func:`resolve_strategy` (a ``strategy:``'s freeze and phases), :func:`train` (every phase,
set up by :func:`setup_phase`, and its epochs), :func:`summarize`. The building blocks before them
(runtime, optimizer groups, LR schedule, loaders, one training epoch, evaluation) stand on
their own; ``benchmarks/gpu_bench.py`` drives some of them directly. What ``--resume``
reads back is a :class:`~ckptsurgeon.finetune.state.TrainingState`.

Plain PyTorch. One process, or several under ``torchrun`` (DDP, gloo on CPU and nccl on
CUDA; only rank 0 writes). Every phase rebuilds the optimizer, the LR schedule and the DDP
wrapper after the frozen set changes, which avoids the classic staged-unfreeze bugs
(an optimizer that never sees the new parameters, DDP that skips their gradients).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from ckptsurgeon.errors import UsageError
from ckptsurgeon.finetune import artifacts, features, probe
from ckptsurgeon.finetune import strategy as strategies
from ckptsurgeon.finetune.data import build_dataset, is_deterministic
from ckptsurgeon.finetune.freeze import (
    backbone_names,
    blocks_from_head,
    set_frozen,
    unfrozen_names,
)
from ckptsurgeon.finetune.outputs import model_output, to_device
from ckptsurgeon.finetune.state import STATE_FILE, History, TrainingState
from ckptsurgeon.logs import Log, info
from ckptsurgeon.rules.finetune import FinetuneSpec, PhaseSpec

# A batch's inputs (a tensor, or a mapping of them) -> logits; the model or a cached head.
Forward = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this runner started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def make_runtime(spec: FinetuneSpec) -> Runtime:
    """Pick device and precision; join the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if spec.device == "auto" else spec.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UsageError("finetune.device is cuda but no CUDA device is available")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if world > 1 else spec.device.replace("auto", "cuda"))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    precision = spec.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(device, dtype, rank, world, owns_group)


def param_groups(
    model: nn.Module, backbone: set[str], phase: PhaseSpec, weight_decay: float, decay_all: bool
) -> list[dict[str, Any]]:
    """Named groups: head/backbone x decay/no_decay (no decay on biases and norm weights);
    with ``layer_decay``, backbone groups are split by distance from the head
    (``backbone.decay.depth03``: three blocks below the last, LR x layer_decay**3)."""
    depth = blocks_from_head(model) if phase.layer_decay is not None else {}
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = "backbone" if name in backbone else "head"
        decay = "decay" if decay_all or param.ndim > 1 else "no_decay"
        key, lr = f"{role}.{decay}", phase.lr
        if role == "backbone":
            lr *= phase.backbone_lr_scale
            if phase.layer_decay is not None:
                key += f".depth{depth[name]:02d}"
                lr *= phase.layer_decay ** depth[name]
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": lr,
                "weight_decay": weight_decay if decay == "decay" else 0.0,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def make_optimizer(spec: FinetuneSpec, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=groups[0]["lr"], momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0
        )
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=groups[0]["lr"], betas=o.betas)


def make_schedule(
    optimizer: torch.optim.Optimizer, phase: PhaseSpec, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, phase.epochs * steps_per_epoch)
    warmup = int(phase.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if phase.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loader_for(
    dataset: Dataset, spec: FinetuneSpec, rt: Runtime, shuffle: bool, epoch_seed: int, workers: int
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): resumed runs see the same batches.

    Under several processes, training uses DistributedSampler (which pads every rank to the
    same length, as DDP's lock-step needs); evaluation (``shuffle`` false) gives each rank
    every ``world``-th sample instead, so each sample is counted exactly once."""
    sampler: Sampler[int] | None
    if rt.world > 1 and not shuffle:
        sampler = _EveryNth(len(dataset), rt.rank, rt.world)  # type: ignore[arg-type]
    elif rt.world > 1:
        sampler = DistributedSampler(dataset, rt.world, rt.rank, shuffle=shuffle, seed=spec.seed)
        sampler.set_epoch(epoch_seed)
    elif shuffle:
        sampler = RandomSampler(
            dataset, generator=torch.Generator().manual_seed(spec.seed * 100_003 + epoch_seed)
        )
    else:
        sampler = None
    return DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
    )


class _EveryNth(Sampler[int]):
    """Indices ``rank, rank + world, ...``: one rank's share of an evaluation, no padding."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _workers(spec: FinetuneSpec, dataset: Dataset) -> int:
    if spec.data.num_workers != "auto":
        return spec.data.num_workers
    from ckptsurgeon.finetune.data import TensorFileDataset

    # In-memory tensors are faster without worker processes; decoding images is not.
    return 0 if isinstance(dataset, TensorFileDataset) else min(4, os.cpu_count() or 1)


def batches(loader: DataLoader, label: str, rt: Runtime) -> Iterable[Any]:
    """The loader's batches, with a progress bar on rank 0 when stderr is a terminal."""
    if not (rt.main and sys.stderr.isatty()):
        return loader
    from rich.console import Console
    from rich.progress import track

    return track(loader, description=label, transient=True, console=Console(stderr=True))


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    rt: Runtime,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
    forward: Forward = model_output,
) -> float:
    """One pass of training; returns the mean loss over this process's samples."""
    model.train()
    total, count = 0.0, 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for inputs, target in batches(loader, "training", rt):
        inputs, target = to_device(inputs, rt.device), target.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = forward(model, inputs)
            loss = nn.functional.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        schedule.step()
        total += loss.item() * len(target)
        count += len(target)
    return _all_mean(total, count, rt)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, rt: Runtime, forward: Forward = model_output
) -> tuple[float, float]:
    """Mean loss and accuracy (a fraction) over the whole validation set, all ranks."""
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0
    for inputs, target in batches(loader, "validating", rt):
        inputs, target = to_device(inputs, rt.device), target.to(rt.device)
        with rt.autocast():
            logits = forward(model, inputs).float()
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += len(target)
    if rt.world > 1:
        t = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t)
        loss_sum, correct, count = t.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def _all_mean(total: float, count: int, rt: Runtime) -> float:
    if rt.world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def _save_weights(model: nn.Module, path: str, source: str) -> None:
    """``source``: what the run started from (its weights file, or the model spec)."""
    from ckptsurgeon.formats.table import from_tensor
    from ckptsurgeon.formats.writer import provenance, write_checkpoint

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_checkpoint(
        {k: from_tensor(v, k) for k, v in state.items()},
        path,
        metadata=provenance(source),
    )


def _write_metrics(output_dir: str, metrics: list[dict[str, Any]]) -> None:
    with open(os.path.join(output_dir, artifacts.METRICS), "w", encoding="utf-8") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")


def _plot(output_dir: str, metrics: list[dict[str, Any]]) -> str | None:
    """Draw curves.png; returns why it was not written (matplotlib is optional), or None.

    A plot that fails is reported, not raised: the weights and the summary are what the
    run is for, and they are written already."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; pip install matplotlib"
    try:
        _draw(plt, output_dir, metrics)
    except Exception as exc:  # a picture must not fail a finished run
        plt.close("all")
        return f"plotting failed: {type(exc).__name__}: {exc}"
    return None


def _draw(plt: Any, output_dir: str, metrics: list[dict[str, Any]]) -> None:
    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], label="train")
    if any(m["val_loss"] is not None for m in metrics):
        ax_loss.plot(epochs, [m["val_loss"] for m in metrics], label="val")
        ax_acc.plot(epochs, [m["val_acc"] for m in metrics], label="val acc")
    # Where a phase begins (the frozen set changes): a dashed line on both plots.
    starts = [b["epoch"] - 0.5 for a, b in itertools.pairwise(metrics) if a["phase"] != b["phase"]]
    for x in starts:
        for ax in (ax_loss, ax_acc):
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss" + (" (dashed: a new phase)" if starts else ""))
    ax_loss.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, artifacts.CURVES), dpi=100)
    plt.close(fig)


@dataclass
class Run:
    """A fine-tune, set up once: the runtime, data and model that every phase works on."""

    spec: FinetuneSpec
    rt: Runtime
    model: nn.Module  # unwrapped even under DDP: it is what gets saved, under its own key names
    backbone: set[str]
    train_set: Dataset
    val_set: Dataset | None
    workers: int
    deterministic: bool  # no random augmentation, so features may be cached
    output_dir: str
    source: str
    log: Log

    @property
    def state_path(self) -> str:
        return os.path.join(self.output_dir, STATE_FILE)


@dataclass
class PhaseRun:
    """One phase, set up: the frozen set applied and the optimizer, schedule, scaler and
    (under torchrun) DDP wrapper built for it."""

    index: int
    phase: PhaseSpec
    net: nn.Module  # the model, or its head over cached features; DDP under torchrun
    forward: Forward
    train_data: Dataset
    val_data: Dataset | None
    workers: int
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    trainable: int
    locked: list[str]  # BatchNorm layers kept in eval
    cached: bool


def setup(
    spec: FinetuneSpec, model: nn.Module, rt: Runtime, *, base_dir: str, log: Log, source: str
) -> Run:
    """Seed, make the output folder (rank 0), build the datasets, move ``model`` to the
    device ``rt`` (:func:`make_runtime`) trains on, find its backbone."""
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    # Every path the run reports (summary.json, the result, its closing lines) is under
    # this one: absolute, without "..", links resolved (see ckptsurgeon.finetune.artifacts).
    output_dir = artifacts.real_dir(spec.output_dir, base_dir)
    if rt.main:
        os.makedirs(output_dir, exist_ok=True)
    train_set = build_dataset(spec.data.train, base_dir)
    val_set = build_dataset(spec.data.val, base_dir) if spec.data.val else None
    deterministic = is_deterministic(spec.data.train) and (
        spec.data.val is None or is_deterministic(spec.data.val)
    )
    model.to(rt.device)
    return Run(
        spec=spec,
        rt=rt,
        model=model,
        backbone=backbone_names(model, spec.freeze),
        train_set=train_set,
        val_set=val_set,
        workers=_workers(spec, train_set),
        deterministic=deterministic,
        output_dir=output_dir,
        source=source,
        log=log,
    )


def resume_from(run: Run) -> TrainingState:
    """The state the last completed epoch saved, its weights already loaded into the model."""
    if not os.path.exists(run.state_path):
        raise UsageError(f"--resume: no {run.state_path} to resume from")
    saved = TrainingState.load(run.state_path)
    run.model.load_state_dict(saved.model)
    h = saved.history
    run.log(f"resuming after epoch {h.global_epoch} (phase {h.phase + 1})")
    return saved


def resolve_strategy(
    run: Run, history: History, *, resumed: bool, fresh: Callable[[], nn.Module] | None
) -> None:
    """With ``strategy:``, replace the run's freeze and phases by the strategy's expansion
    (:mod:`ckptsurgeon.finetune.strategy`), measuring first for ``auto``
    (:mod:`ckptsurgeon.finetune.probe`), and keep the choice in ``history.strategy``.

    A resumed run takes the choice its state recorded and re-derives the expansion from
    it; one that comes out different (the rules file changed) is refused. ``scratch``
    re-initialises the model (``fresh`` builds a new one, else every module's
    ``reset_parameters``), except on resume, where the state's weights are the run's own."""
    spec = run.spec
    if spec.strategy is None:
        return
    assert spec.epochs is not None and spec.lr is not None  # the rules validate it
    lay = strategies.layout(run.model, spec.freeze)
    recorded = history.strategy
    record: dict[str, Any] = {"strategy": spec.strategy, "layout": lay.to_dict()}
    if recorded is not None:
        if recorded.get("strategy") != spec.strategy:
            raise UsageError(
                f"--resume: the run began with strategy {recorded.get('strategy')}, the rules "
                f"file now says {spec.strategy}"
            )
        name, depth = recorded["chosen"], recorded.get("freeze_depth")
        record = recorded
    elif resumed:
        raise UsageError(
            "--resume: the saved state records no strategy (was the rules file changed?)"
        )
    elif spec.strategy == "auto":
        choice = probe.measure(
            run.model,
            run.train_set,
            lay,
            spec,
            run.rt,
            untrained=lambda: untrained_copy(run.model, fresh, spec.seed).to(run.rt.device),
        )
        run.log(f"strategy auto: {choice.reason} (measured in {choice.seconds:.2f} s)")
        for score in choice.measurements.get("probe", []):
            run.log(
                f"  probe {score['depth']} ({score['dim']} features): held-out accuracy "
                f"{score['accuracy']:.3f}, chance-corrected {score['separability']:.3f}"
            )
        name, depth = choice.strategy, choice.freeze_depth
        record.update(choice.to_dict())
    else:
        name, depth = spec.strategy, spec.freeze_depth
        record.update(chosen=name, reason="set in the rules file")
    expansion = strategies.expand(
        name, spec.epochs, spec.lr, lay, freeze_depth=depth, train_bn=spec.freeze.train_bn
    )
    derived = expansion.to_dict()
    if recorded is not None and recorded.get("expansion") != derived:
        raise UsageError(
            f"--resume: strategy {spec.strategy} now expands differently than when the run "
            "began (were epochs, lr or the model changed?)"
        )
    record.update(freeze_depth=expansion.freeze_depth, expansion=derived)
    history.strategy = record
    if expansion.reinitialise and not resumed:
        _reinitialise(run.model, fresh, spec.seed)
    run.spec = expansion.spec(spec)
    run.backbone = backbone_names(run.model, run.spec.freeze)
    run.log(
        f"strategy {spec.strategy}: {name}, "
        + "; ".join(_phase_summary(p) for p in expansion.phases)
        + (" (model re-initialised)" if expansion.reinitialise and not resumed else "")
    )


def _phase_summary(p: PhaseSpec) -> str:
    what = (
        "all layers"
        if not p.frozen
        else "head" + (f" + {', '.join(p.unfreeze)}" if p.unfreeze else "")
    )
    scale = f", backbone x{p.backbone_lr_scale:g}" if p.backbone_lr_scale != 1 else ""
    return f"{p.epochs} epochs {what} at lr {p.lr:g}{scale}"


def untrained_copy(model: nn.Module, fresh: Callable[[], nn.Module] | None, seed: int) -> nn.Module:
    """``model``'s architecture with fresh weights, as training from scratch starts from:
    a newly built model (its constructor's own initialisation), else a copy whose modules'
    ``reset_parameters`` ran. Seeded with ``seed``, without moving the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if fresh is not None:
            return fresh()
        new = copy.deepcopy(model)
        for module in new.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        return new


def _reinitialise(model: nn.Module, fresh: Callable[[], nn.Module] | None, seed: int) -> None:
    """Replace ``model``'s weights by :func:`untrained_copy`'s, in place."""
    model.load_state_dict(untrained_copy(model, fresh, seed).state_dict())


def setup_phase(run: Run, index: int) -> PhaseRun:
    """Freeze for phase ``index`` and build what trains it (on cached features where that
    is allowed). The optimizer, schedule and DDP wrapper are new each phase: ones built for
    the last phase would miss the parameters this one unfreezes."""
    spec, rt, model = run.spec, run.rt, run.model
    phase = spec.phases[index]
    where = f"finetune.phases[{index}]"
    unfrozen = unfrozen_names(model, run.backbone, phase.unfreeze, where)
    # What stays frozen shrinks; the unfrozen part keeps the backbone's LR scale below.
    locked = set_frozen(model, run.backbone - unfrozen, phase.frozen, spec.freeze.train_bn)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise UsageError(f"phase {index + 1}: nothing is trainable (freeze selects everything)")
    groups = param_groups(
        model, run.backbone, phase, spec.optimizer.weight_decay, spec.optimizer.decay_norm_and_bias
    )

    cache = None
    want_cache = spec.cache_features
    if want_cache is True or (want_cache == "auto" and run.deterministic and phase.frozen):
        cache = features.try_cache(
            model, run.train_set, run.val_set, spec, rt, strict=want_cache is True, log=run.log
        )
    train_data, val_data = (cache.train, cache.val) if cache else (run.train_set, run.val_set)
    net = cache.head if cache else model
    if rt.world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    optimizer = make_optimizer(spec, groups)
    steps = len(loader_for(train_data, spec, rt, True, 0, 0))
    return PhaseRun(
        index=index,
        phase=phase,
        net=net,
        forward=features.head_forward if cache else model_output,
        train_data=train_data,
        val_data=val_data,
        workers=0 if cache else run.workers,  # cached features are in-memory tensors
        optimizer=optimizer,
        schedule=make_schedule(optimizer, phase, steps),
        scaler=torch.amp.GradScaler(rt.device.type) if rt.dtype == torch.float16 else None,
        trainable=trainable,
        locked=locked,
        cached=cache is not None,
    )


def train(run: Run, history: History, saved: TrainingState | None = None) -> None:
    """Run the phases and their epochs from where ``history`` stands, updating it; after
    each epoch evaluate and (rank 0) save the state, the metrics and last/best weights.

    ``saved``: the state ``history`` came from, restored into the first phase run."""
    spec, rt = run.spec, run.rt
    for index in range(history.phase, len(spec.phases)):
        p = setup_phase(run, index)
        if saved is not None:  # it was taken in this phase: the first one run
            saved.restore(p.optimizer, p.schedule, p.scaler, rt.device)
            saved = None
        run.log(_phase_line(p, len(spec.phases)))

        for e in range(history.epoch_in_phase, p.phase.epochs):
            t0 = time.perf_counter()
            loader = loader_for(p.train_data, spec, rt, True, history.global_epoch, p.workers)
            train_loss = run_epoch(
                p.net, loader, rt, p.optimizer, p.schedule, p.scaler, spec.grad_clip, p.forward
            )
            val_loss = val_acc = None
            if p.val_data is not None:
                val_loader = loader_for(p.val_data, spec, rt, False, 0, p.workers)
                val_loss, val_acc = evaluate(p.net, val_loader, rt, p.forward)
            history.global_epoch += 1
            history.phase, history.epoch_in_phase = index, e + 1
            metrics = {
                "phase": index + 1, "epoch": history.global_epoch, "train_loss": train_loss,
                "val_loss": val_loss, "val_acc": val_acc,
                "lr": next((g["lr"] for g in p.optimizer.param_groups if g["name"].startswith("head")),
                           p.optimizer.param_groups[0]["lr"]),
                "trainable_params": p.trainable, "seconds": round(time.perf_counter() - t0, 4),
            }  # fmt: skip
            if e == 0:  # each phase's first line: the LR of every group, as it starts
                metrics["group_lrs"] = {
                    g["name"]: g["initial_lr"] for g in p.optimizer.param_groups
                }
            history.metrics.append(metrics)
            improved = artifacts.score(metrics) > history.best_score
            history.best_score = max(history.best_score, artifacts.score(metrics))
            if rt.main:
                _save_epoch(run, p, history, improved)
            run.log(_epoch_line(metrics))
        history.phase, history.epoch_in_phase = index + 1, 0


def _save_epoch(run: Run, p: PhaseRun, history: History, improved: bool) -> None:
    # The state first: it is what --resume trusts, the rest follows it.
    state = TrainingState.capture(
        run.model, p.optimizer, p.schedule, p.scaler, history, run.rt.device
    )
    state.save(run.state_path)
    _write_metrics(run.output_dir, history.metrics)
    _save_weights(run.model, os.path.join(run.output_dir, artifacts.LAST), run.source)
    if improved:
        _save_weights(run.model, os.path.join(run.output_dir, artifacts.BEST), run.source)


def _phase_line(p: PhaseRun, phases: int) -> str:
    return (
        f"phase {p.index + 1}/{phases}: {'frozen backbone' if p.phase.frozen else 'all layers'}, "
        f"{p.trainable:,} trainable parameters, lr {p.phase.lr:g}"
        + (f", {len(p.locked)} BatchNorm layers kept in eval" if p.locked else "")
        + (", cached features" if p.cached else "")
    )


def _epoch_line(m: dict[str, Any]) -> str:
    return (
        f"epoch {m['epoch']}: train_loss {m['train_loss']:.4f}"
        + (
            f", val_loss {m['val_loss']:.4f}, val_acc {m['val_acc']:.4f}"
            if m["val_loss"] is not None
            else ""
        )
        + f" ({m['seconds']:.2f} s)"
    )


def summarize(run: Run, history: History, seconds: float) -> dict[str, Any]:
    """The run's summary (``seconds``: the training's wall time); rank 0 also plots
    curves.png, writes summary.json and ends the run's output with the closing lines
    (:func:`ckptsurgeon.finetune.artifacts.closing_lines`). Under torchrun every rank waits
    here until rank 0 has written them.

    Besides the numbers, the summary says where things went: ``output_dir`` and ``files``
    (``best``, ``last``, ``summary``, ``curves``, ``metrics``, ``state``: real paths, None
    for a file the run has not got, with ``curves_not_written`` saying why for the
    curves) and ``best`` (the epoch in best.safetensors, its metric and value)."""
    rt = run.rt
    # Plotted first, so that summary.json can say whether it was.
    not_plotted = _plot(run.output_dir, history.metrics) if rt.main else None
    summary: dict[str, Any] = {
        "epochs": history.global_epoch,
        "best_score": history.best_score,
        "best": artifacts.best_epoch(history.metrics),
        "final": history.metrics[-1] if history.metrics else None,
        "seconds": round(seconds, 3),
        "device": str(rt.device),
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[rt.dtype],
        "world_size": rt.world,
        "output_dir": run.output_dir,
        "files": artifacts.files(run.output_dir, history.metrics, curves=not_plotted is None),
    }
    if not_plotted is not None:
        summary["curves_not_written"] = not_plotted
    if history.strategy is not None:
        summary["strategy"] = history.strategy
    if rt.main:
        with open(summary["files"]["summary"], "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        for line in artifacts.closing_lines(summary):
            run.log(line)
    if rt.world > 1:
        dist.barrier()
        curves = summary["files"]["curves"]
        if not rt.main and curves is not None and not os.path.exists(curves):
            # Rank 0 plots; the others learn whether it did from the file system.
            summary["files"]["curves"] = None
            summary["curves_not_written"] = "rank 0 wrote none"
    return summary


def run_finetune(
    spec: FinetuneSpec,
    model: nn.Module,
    *,
    base_dir: str,
    resume: bool = False,
    log: Log = info,
    source: str = "",
    fresh: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (weights already loaded) as ``spec`` says; returns the summary.

    ``source`` names what the weights came from; ``last``/``best.safetensors`` record it.
    ``fresh`` builds the model anew, for ``strategy: scratch`` (see :func:`resolve_strategy`).
    """
    begun = time.perf_counter()
    rt = make_runtime(spec)
    # Everything after joining the process group is inside the try: a run that fails in
    # setup or in its strategy still ends the group it started.
    try:
        run = setup(spec, model, rt, base_dir=base_dir, log=log, source=source)
        saved = resume_from(run) if resume else None
        history = saved.history if saved is not None else History()
        measured = spec.strategy == "auto" and history.strategy is None
        resolve_strategy(run, history, resumed=saved is not None, fresh=fresh)
        started = time.perf_counter()
        train(run, history, saved)
        if measured and history.strategy is not None:
            # The measurement's cost against the whole run, setup and measurement included.
            run_seconds = time.perf_counter() - begun
            history.strategy["run_seconds"] = round(run_seconds, 3)
            history.strategy["measure_fraction"] = probe.fraction(
                history.strategy["measure_seconds"], run_seconds
            )
        return summarize(run, history, time.perf_counter() - started)
    finally:
        if rt.owns_group and dist.is_initialized():
            dist.destroy_process_group()
