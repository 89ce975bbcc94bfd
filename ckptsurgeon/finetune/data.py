"""Datasets for the fine-tune runner: tensor files, image folders, or a user factory."""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.utils.data import Dataset

from ckptsurgeon.errors import UsageError
from ckptsurgeon.paths import resolve
from ckptsurgeon.rules.finetune import DataSpec, FactoryData, ImageFolderData, TensorData

Inputs = torch.Tensor | dict[str, torch.Tensor]


class TensorFileDataset(Dataset):
    """Rows of tensors read from a checkpoint-like file (safetensors or torch)."""

    def __init__(self, inputs: Inputs, target: torch.Tensor) -> None:
        self.inputs = inputs
        self.target = target

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> tuple[Inputs, torch.Tensor]:
        if isinstance(self.inputs, dict):
            return {k: v[i] for k, v in self.inputs.items()}, self.target[i]
        return self.inputs[i], self.target[i]


def load_tensor_data(spec: TensorData, base_dir: str) -> TensorFileDataset:
    from ckptsurgeon.formats.reader import open_checkpoint
    from ckptsurgeon.formats.table import LazyStateDict

    tensors = LazyStateDict(open_checkpoint(resolve(spec.tensors, base_dir)).tensors)
    names = spec.inputs.values() if isinstance(spec.inputs, dict) else [spec.inputs]
    absent = [n for n in [*names, spec.target] if n not in tensors]
    if absent:
        raise UsageError(f"{spec.tensors}: no tensors named {absent}; it holds {sorted(tensors)}")
    if isinstance(spec.inputs, dict):
        inputs: Inputs = {arg: tensors[name] for arg, name in spec.inputs.items()}
        sizes = {len(v) for v in inputs.values()}
    else:
        inputs = tensors[spec.inputs]
        sizes = {len(inputs)}
    target = tensors[spec.target]
    if sizes != {len(target)}:
        raise UsageError(f"{spec.tensors}: inputs and target have different lengths")
    return TensorFileDataset(inputs, target)


def build_dataset(spec: DataSpec, base_dir: str) -> Dataset:
    """The Dataset a data spec describes; relative paths resolve against ``base_dir``."""
    if isinstance(spec, TensorData):
        return load_tensor_data(spec, base_dir)
    if isinstance(spec, ImageFolderData):
        try:
            from torchvision import datasets, transforms
        except ImportError:
            raise UsageError(
                "image_folder data needs torchvision: pip install 'ckptsurgeon[vision]'"
            ) from None
        transform = transforms.Compose([
            transforms.Resize(spec.image_size),
            transforms.CenterCrop(spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ])  # fmt: skip
        return datasets.ImageFolder(resolve(spec.image_folder, base_dir), transform=transform)
    assert isinstance(spec, FactoryData)
    from ckptsurgeon.targets.models import load_callable

    dataset: Any = load_callable(spec.factory, base_dir)(**spec.kwargs)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise UsageError(
            f"data factory {spec.factory} returned {type(dataset).__name__}, "
            "not a map-style torch Dataset"
        )
    module_part, _, attr = spec.factory.rpartition(":")
    if module_part.endswith(".py"):  # a package module is importable by name already
        return FileFactoryDataset(dataset, f"{resolve(module_part, base_dir)}:{attr}")
    return dataset


class FileFactoryDataset(Dataset):
    """A dataset a ``file.py:callable`` factory made, which DataLoader workers can unpickle.

    The file is imported under a name of its own (``ckptsurgeon_user_<digest>``), which is
    no importable module: a worker started with ``spawn`` or ``forkserver`` that unpickles
    the dataset cannot find its class. Pickled, this wrapper carries the factory's absolute
    ``file.py:callable`` and the dataset's own pickle; unpickling imports the file again
    under the same name first (:func:`_rebuild`). Reading it is reading the dataset: items,
    length and any other attribute (``targets``) pass through."""

    def __init__(self, dataset: Any, factory: str) -> None:
        self.dataset = dataset
        self.factory = factory  # absolute file path, so a worker's working folder is moot

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getattr__(self, name: str) -> Any:
        # Only reached for what the wrapper lacks; "dataset" itself is looked up in
        # __dict__, so a half-built instance raises instead of recursing.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __reduce__(self) -> tuple[Any, tuple[str, bytes]]:
        return _rebuild, (self.factory, pickle.dumps(self.dataset))


def _rebuild(factory: str, payload: bytes) -> FileFactoryDataset:
    """Import the factory's file under its stable name, then unpickle the dataset."""
    from ckptsurgeon.targets.models import load_callable

    load_callable(factory)
    return FileFactoryDataset(pickle.loads(payload), factory)


def is_deterministic(spec: DataSpec) -> bool:
    """Whether a sample is the same every time it is read (no random augmentation)."""
    return not (isinstance(spec, FactoryData) and spec.augments)
