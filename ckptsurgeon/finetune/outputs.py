"""Calling a model on a batch and finding its output tensor (``.logits``, tuples, tensors)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_output(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call the model (``model(**inputs)`` for a mapping) and return its logits."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)
