"""A model's output tensor, whatever the model returns (``.logits``, ModelOutputs, tuples)."""

from __future__ import annotations

from typing import Any

import torch


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's result stands for: ``.logits`` when it has them, else the first
    tensor of a ModelOutput (``last_hidden_state``), a tuple or a list, else ``out``."""
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput without logits
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0])
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, not a tensor")
    return out
