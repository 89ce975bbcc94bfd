"""Small model factories that example rules files name as ``models.py:callable``.

A rules file's ``target.model`` takes ``"pkg.module:callable"`` or ``"file.py:callable"``
(relative to the rules file); these cover models no library builds in one call.
"""

from __future__ import annotations

import torch


def resnet18_grayscale(num_classes: int = 1000) -> torch.nn.Module:
    """torchvision's resnet18 with a 1-channel stem (timm's ``in_chans=1``)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


class DigitsCNN(torch.nn.Module):
    """A small CNN for scikit-learn's 8x8 digits: a conv feature extractor and a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        )  # fmt: skip
        self.fc = torch.nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def digits_cnn(num_classes: int = 10) -> torch.nn.Module:
    return DigitsCNN(num_classes)
