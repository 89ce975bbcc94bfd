"""The fine-tune recipe, top to bottom: freeze, build the optimizer per phase, train, resume.

Plain PyTorch. One process, or several under ``torchrun`` (DDP, gloo on CPU and nccl on
CUDA; only rank 0 writes). Every phase rebuilds the optimizer, the LR schedule and the DDP
wrapper after the frozen set changes, which avoids the classic staged-unfreeze bugs
(an optimizer that never sees the new parameters, DDP that skips their gradients).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ckptsurgeon.errors import UsageError
from ckptsurgeon.finetune import features
from ckptsurgeon.finetune.data import build_dataset, is_deterministic
from ckptsurgeon.finetune.freeze import backbone_names, set_frozen
from ckptsurgeon.finetune.outputs import model_output, to_device
from ckptsurgeon.rules.finetune import FinetuneSpec, PhaseSpec

STATE_FILE = "state.pt"


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    precision = spec.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(device, dtype, rank, world)


def param_groups(
    model: nn.Module, backbone: set[str], phase: PhaseSpec, weight_decay: float, decay_all: bool
) -> list[dict[str, Any]]:
    """Named groups: head/backbone x decay/no_decay (no decay on biases and norm weights)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = "backbone" if name in backbone else "head"
        decay = "decay" if decay_all or param.ndim > 1 else "no_decay"
        groups.setdefault(f"{role}.{decay}", []).append(param)
    return [
        {
            "name": name,
            "params": params,
            "lr": phase.lr * (phase.backbone_lr_scale if name.startswith("backbone") else 1.0),
            "weight_decay": weight_decay if name.endswith(".decay") else 0.0,
        }
        for name, params in sorted(groups.items())
    ]


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
    """A loader whose order depends only on (seed, epoch): resumed runs see the same batches."""
    if rt.world > 1:
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


def _workers(spec: FinetuneSpec, dataset: Dataset) -> int:
    if spec.data.num_workers != "auto":
        return spec.data.num_workers
    from ckptsurgeon.finetune.data import TensorFileDataset

    # In-memory tensors are faster without worker processes; decoding images is not.
    return 0 if isinstance(dataset, TensorFileDataset) else min(4, os.cpu_count() or 1)


@dataclass
class History:
    """What resume needs beyond the model and optimizer: where we are and the best so far."""

    phase: int = 0
    epoch_in_phase: int = 0  # epochs completed in ``phase``
    global_epoch: int = 0
    best_score: float = -math.inf
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _score(m: dict[str, Any]) -> float:
    if m.get("val_acc") is not None:
        return m["val_acc"]
    if m.get("val_loss") is not None:
        return -m["val_loss"]
    return -m["train_loss"]


def batches(loader: DataLoader, label: str, rt: Runtime):
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
    optimizer,
    schedule,
    scaler,
    grad_clip: float | None,
    forward=model_output,
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
    model: nn.Module, loader: DataLoader, rt: Runtime, forward=model_output
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


def _rng_state(rt: Runtime) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if rt.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    return state


def _set_rng_state(state: dict[str, Any], rt: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], rt.device)


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


def _save_state(
    path: str, model: nn.Module, optimizer, schedule, scaler, history: History, rt: Runtime
) -> None:
    """The resumable state, written atomically (temporary file, fsync, rename)."""
    from ckptsurgeon.formats.writer import atomic_path

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "param_groups": [g["name"] for g in optimizer.param_groups],
        "rng": _rng_state(rt),
        "history": {
            "phase": history.phase,
            "epoch_in_phase": history.epoch_in_phase,
            "global_epoch": history.global_epoch,
            "best_score": history.best_score,
            "metrics": json.dumps(history.metrics),
        },
    }
    with atomic_path(path, is_dir=False) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _load_state(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"--resume: cannot read {path}: {exc}") from None


def _write_metrics(output_dir: str, metrics: list[dict[str, Any]]) -> None:
    with open(os.path.join(output_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")


def run_finetune(
    spec: FinetuneSpec,
    model: nn.Module,
    *,
    base_dir: str,
    resume: bool = False,
    log=print,
    source: str = "",
) -> dict[str, Any]:
    """Train ``model`` (weights already loaded) as ``spec`` says; returns the summary.

    ``source`` names what the weights came from; ``last``/``best.safetensors`` record it."""
    rt = make_runtime(spec)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    output_dir = (
        spec.output_dir
        if os.path.isabs(spec.output_dir)
        else os.path.join(base_dir, spec.output_dir)
    )
    if rt.main:
        os.makedirs(output_dir, exist_ok=True)
    state_path = os.path.join(output_dir, STATE_FILE)

    train_set = build_dataset(spec.data.train, base_dir)
    val_set = build_dataset(spec.data.val, base_dir) if spec.data.val else None
    workers = _workers(spec, train_set)
    deterministic = is_deterministic(spec.data.train) and (
        spec.data.val is None or is_deterministic(spec.data.val)
    )

    model.to(rt.device)
    backbone = backbone_names(model, spec.freeze)
    history = History()
    saved: dict[str, Any] | None = None
    if resume:
        if not os.path.exists(state_path):
            raise UsageError(f"--resume: no {state_path} to resume from")
        saved = _load_state(state_path)
        model.load_state_dict(saved["model"])
        h = saved["history"]
        history = History(
            h["phase"],
            h["epoch_in_phase"],
            h["global_epoch"],
            h["best_score"],
            json.loads(h["metrics"]),
        )
        log(f"resuming after epoch {history.global_epoch} (phase {history.phase + 1})")

    scaler_needed = rt.dtype == torch.float16
    started = time.perf_counter()
    for p_index, phase in enumerate(spec.phases):
        if p_index < history.phase:
            continue
        locked = set_frozen(model, backbone, phase.frozen, spec.freeze.train_bn)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable == 0:
            raise UsageError(
                f"phase {p_index + 1}: nothing is trainable (freeze selects everything)"
            )
        groups = param_groups(
            model, backbone, phase, spec.optimizer.weight_decay, spec.optimizer.decay_norm_and_bias
        )

        cache = None
        want_cache = spec.cache_features
        if want_cache is True or (want_cache == "auto" and deterministic and phase.frozen):
            cache = features.try_cache(
                model, train_set, val_set, spec, rt, strict=want_cache is True, log=log
            )
        train_data, val_data = (cache.train, cache.val) if cache else (train_set, val_set)
        net = cache.head if cache else model
        forward = features.head_forward if cache else model_output
        if rt.world > 1:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
            )
        optimizer = make_optimizer(spec, groups)
        steps = len(loader_for(train_data, spec, rt, True, 0, 0))
        schedule = make_schedule(optimizer, phase, steps)
        scaler = torch.amp.GradScaler(rt.device.type) if scaler_needed else None
        if saved is not None and p_index == history.phase:
            if saved["param_groups"] != [g["name"] for g in optimizer.param_groups]:
                raise UsageError(
                    "--resume: the saved optimizer's parameter groups do not match "
                    "this phase (was the rules file changed?)"
                )
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["scheduler"])
            if scaler is not None and saved["scaler"] is not None:
                scaler.load_state_dict(saved["scaler"])
            _set_rng_state(saved["rng"], rt)
        log(
            f"phase {p_index + 1}/{len(spec.phases)}: {'frozen backbone' if phase.frozen else 'all layers'}, "
            f"{trainable:,} trainable parameters, lr {phase.lr:g}"
            + (f", {len(locked)} BatchNorm layers kept in eval" if locked else "")
            + (", cached features" if cache else "")
        )

        for e in range(history.epoch_in_phase if p_index == history.phase else 0, phase.epochs):
            t0 = time.perf_counter()
            loader = loader_for(
                train_data, spec, rt, True, history.global_epoch, workers if not cache else 0
            )
            train_loss = run_epoch(
                net, loader, rt, optimizer, schedule, scaler, spec.grad_clip, forward
            )
            val_loss = val_acc = None
            if val_data is not None:
                val_loader = loader_for(val_data, spec, rt, False, 0, workers if not cache else 0)
                val_loss, val_acc = evaluate(net, val_loader, rt, forward)
            history.global_epoch += 1
            history.phase, history.epoch_in_phase = p_index, e + 1
            metrics = {
                "phase": p_index + 1, "epoch": history.global_epoch, "train_loss": train_loss,
                "val_loss": val_loss, "val_acc": val_acc,
                "lr": next((g["lr"] for g in optimizer.param_groups if g["name"].startswith("head")),
                           optimizer.param_groups[0]["lr"]),
                "trainable_params": trainable, "seconds": round(time.perf_counter() - t0, 4),
            }  # fmt: skip
            history.metrics.append(metrics)
            improved = _score(metrics) > history.best_score
            history.best_score = max(history.best_score, _score(metrics))
            if rt.main:  # the state first: it is what --resume trusts, the rest follows it
                _save_state(state_path, model, optimizer, schedule, scaler, history, rt)
                _write_metrics(output_dir, history.metrics)
                _save_weights(model, os.path.join(output_dir, "last.safetensors"), source)
                if improved:
                    _save_weights(model, os.path.join(output_dir, "best.safetensors"), source)
            log(
                f"epoch {history.global_epoch}: train_loss {train_loss:.4f}"
                + (
                    f", val_loss {val_loss:.4f}, val_acc {val_acc:.4f}"
                    if val_loss is not None
                    else ""
                )
                + f" ({metrics['seconds']:.2f} s)"
            )
        history.phase, history.epoch_in_phase = p_index + 1, 0
        saved = None

    summary = {
        "epochs": history.global_epoch,
        "best_score": history.best_score,
        "final": history.metrics[-1] if history.metrics else None,
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(rt.device),
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[rt.dtype],
        "world_size": rt.world,
        "output_dir": output_dir,
    }
    if rt.main:
        with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        _plot(output_dir, history.metrics)
    if rt.world > 1:
        dist.barrier()
    return summary


def _plot(output_dir: str, metrics: list[dict[str, Any]]) -> None:
    """curves.png when matplotlib is installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], label="train")
    if any(m["val_loss"] is not None for m in metrics):
        ax_loss.plot(epochs, [m["val_loss"] for m in metrics], label="val")
        ax_acc.plot(epochs, [m["val_acc"] for m in metrics], label="val acc")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "curves.png"), dpi=100)
    plt.close(fig)
