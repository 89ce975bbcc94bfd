"""What ``--resume`` reads back: the training state after an epoch, as one typed value.

``state.pt`` is a plain ``torch.save`` of a dict of tensors, numbers, strings and
containers, so that :meth:`TrainingState.load` can read it with ``weights_only=True`` and a
state file from elsewhere cannot run code. Its layout is the one earlier versions wrote:
``model``, ``optimizer``, ``scheduler``, ``scaler``, ``param_groups``, ``rng`` and
``history`` (the metrics inside it as one JSON string); files written before this module
existed still resume.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckptsurgeon.errors import UsageError

STATE_FILE = "state.pt"


@dataclass
class History:
    """What resume needs beyond the model and optimizer: where we are and the best so far."""

    phase: int = 0
    epoch_in_phase: int = 0  # epochs completed in ``phase``
    global_epoch: int = 0
    best_score: float = -math.inf
    metrics: list[dict[str, Any]] = field(default_factory=list)
    # With a strategy: what it expanded into and, for auto, the choice and its numbers;
    # a resumed run trains this record instead of measuring again.
    strategy: dict[str, Any] | None = None


@dataclass
class TrainingState:
    """The model, optimizer, LR schedule, loss scaler and RNG state, with the
    :class:`History`, at the end of an epoch.

    ``param_groups`` names the optimizer's groups in order: a resumed phase whose groups
    differ (the rules file changed) is refused rather than given mismatched moments."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    param_groups: list[str]
    rng: dict[str, Any]
    history: History

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        history: History,
        device: torch.device,
    ) -> TrainingState:
        """The state as it is now. Not a copy: the tensors and ``history`` are the live
        ones (copying a large model each epoch would double its memory), so save it before
        training goes on."""
        return cls(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=schedule.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            param_groups=[g["name"] for g in optimizer.param_groups],
            rng=_rng_state(device),
            history=history,
        )

    def save(self, path: str) -> None:
        """Write ``path`` atomically (temporary file, fsync, rename): a run killed while
        saving leaves the previous state in place, never a torn one."""
        from ckptsurgeon.formats.atomic import atomic_path
        from ckptsurgeon.formats.fsync import fsync_file

        h = self.history
        state = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "param_groups": self.param_groups,
            "rng": self.rng,
            "history": {
                "phase": h.phase,
                "epoch_in_phase": h.epoch_in_phase,
                "global_epoch": h.global_epoch,
                "best_score": h.best_score,
                "metrics": json.dumps(h.metrics),
                "strategy": json.dumps(h.strategy),
            },
        }
        with atomic_path(path, is_dir=False) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            fsync_file(f)

    @classmethod
    def load(cls, path: str) -> TrainingState:
        """Read ``path`` onto the CPU with ``weights_only=True``, so that a pickled object
        in it is refused, never run. Anything but a state :meth:`save` wrote is a
        :class:`~ckptsurgeon.errors.UsageError`."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            h = state["history"]
            return cls(
                model=state["model"],
                optimizer=state["optimizer"],
                scheduler=state["scheduler"],
                scaler=state["scaler"],
                param_groups=state["param_groups"],
                rng=state["rng"],
                history=History(
                    h["phase"],
                    h["epoch_in_phase"],
                    h["global_epoch"],
                    h["best_score"],
                    json.loads(h["metrics"]),
                    json.loads(h.get("strategy", "null")),  # absent in older state files
                ),
            )
        except Exception as exc:
            raise UsageError(f"--resume: cannot read {path}: {exc}") from None

    def restore(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        device: torch.device,
    ) -> None:
        """Load the optimizer, schedule, scaler and RNG state into a freshly built phase.

        The model is not among them: it is loaded before the phases are set up, because
        setting them up (the feature cache) already runs it."""
        if self.param_groups != [g["name"] for g in optimizer.param_groups]:
            raise UsageError(
                "--resume: the saved optimizer's parameter groups do not match "
                "this phase (was the rules file changed?)"
            )
        optimizer.load_state_dict(self.optimizer)
        schedule.load_state_dict(self.scheduler)
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)
        _set_rng_state(self.rng, device)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    # A state saved on CUDA resumes on the CPU too, minus the CUDA generator it cannot use.
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
