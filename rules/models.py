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
