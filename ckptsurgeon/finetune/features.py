"""Cached features: when only the head trains, run the frozen rest of the model once.

The cache is taken only when it cannot change the result: the trainable parameters all sit
in one module (the head), that module's output is the model's output, it receives one
tensor, nothing upstream behaves differently in train mode (frozen BatchNorm is locked in
eval, no active dropout), and the data has no random augmentation. The head's inputs are
captured with a forward hook, so any architecture qualifies, not just nn.Sequential.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ckptsurgeon.errors import UsageError

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class Cached:
    head: nn.Module
    train: TensorDataset
    val: TensorDataset | None


def head_forward(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    from ckptsurgeon.finetune.outputs import model_output

    return model_output(head, features)


def find_head(model: nn.Module) -> tuple[str, nn.Module] | str:
    """The one module that owns every trainable parameter, or why there is none."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    owners = {n.rpartition(".")[0] for n in trainable}
    common = owners.pop() if len(owners) == 1 else common_prefix(trainable)
    if not common:
        return "the trainable parameters are not inside one submodule"
    head = model.get_submodule(common)
    if not all(p.requires_grad for p in head.parameters()):
        return f"module {common!r} is only partly trainable"
    return common, head


def common_prefix(names: list[str]) -> str:
    """The longest module path that holds every parameter in ``names`` ("" for none)."""
    parts = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for segment in zip(*parts, strict=False):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return ".".join(prefix)


def _upstream_trains_differently(model: nn.Module, head_name: str) -> str | None:
    for name, module in model.named_modules():
        if name == head_name or name.startswith(head_name + "."):
            continue
        if isinstance(module, _DROPOUT) and module.p > 0:
            return f"{name or 'the model'} is an active dropout layer"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and "train" not in vars(module):
            return f"BatchNorm {name!r} would update its statistics in train mode (train_bn)"
    return None


def try_cache(
    model: nn.Module, train_set: Dataset, val_set: Dataset | None, spec, rt, *, strict: bool, log
) -> Cached | None:
    """Compute the head's inputs for every sample once, or return None (saying why)."""
    found = find_head(model)
    reason = found if isinstance(found, str) else _upstream_trains_differently(model, found[0])
    if reason is None:
        head_name, head = found
        try:
            train = _features(model, head, train_set, spec, rt)
            val = _features(model, head, val_set, spec, rt) if val_set is not None else None
            log(
                f"cached features: {len(train)} training samples through the frozen model, "
                f"head {head_name!r} trains alone"
            )
            return Cached(head, train, val)
        except _NotCacheable as exc:
            reason = str(exc)
    if strict:
        raise UsageError(f"cache_features: true, but {reason}")
    log(f"not caching features: {reason}")
    return None


class _NotCacheable(Exception):
    pass


@torch.no_grad()
def _features(model: nn.Module, head: nn.Module, dataset: Dataset, spec, rt) -> TensorDataset:
    from ckptsurgeon.finetune.outputs import model_output, to_device

    captured: dict[str, Any] = {}

    def grab(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise _NotCacheable("the head is not called with exactly one tensor")
        captured["input"], captured["output"] = args[0], output

    hook = head.register_forward_hook(grab, with_kwargs=True)
    feats, targets = [], []
    was_training = model.training
    model.eval()
    try:
        for inputs, target in DataLoader(dataset, batch_size=spec.batch_size, shuffle=False):
            captured.clear()
            with rt.autocast():
                logits = model_output(model, to_device(inputs, rt.device))
            if "input" not in captured:
                raise _NotCacheable("the head module is never called")
            head_logits = captured["output"]
            head_logits = getattr(head_logits, "logits", head_logits)
            if isinstance(head_logits, (tuple, list)):
                head_logits = head_logits[0]
            if not (isinstance(head_logits, torch.Tensor) and torch.equal(head_logits, logits)):
                raise _NotCacheable("the head's output is not the model's output")
            feats.append(captured["input"].detach().to("cpu"))
            targets.append(target)
    finally:
        hook.remove()
        model.train(was_training)
    return TensorDataset(torch.cat(feats), torch.cat(targets))
