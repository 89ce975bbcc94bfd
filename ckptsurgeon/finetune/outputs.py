"""Calling a model on a batch and moving batches to its device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ckptsurgeon.targets.outputs import output_tensor


def model_output(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call the model (``model(**inputs)`` for a mapping) and return its logits."""
    return output_tensor(model(**inputs) if isinstance(inputs, dict) else model(inputs))


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)
