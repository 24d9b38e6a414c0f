"""CIFAR-style ResNets (He et al., 2016) with option-B (1x1 projection) shortcuts."""

from __future__ import annotations

import torch
import torch.nn as nn

from .segmentation import BasicBlock

__all__ = ["CifarResNet", "cifar_resnet"]


class CifarResNet(nn.Module):
    """ResNet for small images: a 3x3 stem and three stages of ``n`` BasicBlocks.

    Stage widths are ``(w, 2w, 4w)``; stages 2 and 3 downsample by 2 with a 1x1
    projection shortcut. Global average pooling and a linear classifier (:attr:`fc`)
    follow. Depth is ``6 * n + 2``.

    Args:
        depth: Network depth; ``depth - 2`` must be divisible by 6 (20, 32, 44, 56, 110...).
        num_classes: Number of classes.
        width: Base width ``w``.
        in_chans: Input image channels.

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 2``.
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, width: int = 16, in_chans: int = 3
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        w = width
        self.conv1 = nn.Conv2d(in_chans, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        stages = []
        prev = w
        for i, c in enumerate((w, 2 * w, 4 * w)):
            blocks = [BasicBlock(prev, c, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(c, c) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = c
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits ``[B, num_classes]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(
    depth: int = 20, num_classes: int = 10, width: int = 16, in_chans: int = 3
) -> CifarResNet:
    """Build a CIFAR-style ResNet.

    Args:
        depth: ``6n + 2`` (e.g. 20 or 56).
        num_classes: Number of classes.
        width: Base width (16 in the original paper).
        in_chans: Input channels (3 for RGB, 1 for grey digits).

    Returns:
        The :class:`CifarResNet`; ``forward`` returns logits ``[B, num_classes]``.
    """
    return CifarResNet(depth=depth, num_classes=num_classes, width=width, in_chans=in_chans)
