"""A small PSMNet-style stereo network that trains on a CPU in minutes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .segmentation import BasicBlock, conv_bn_relu

__all__ = ["ResBlock3d", "StereoNetLite", "conv3d_bn_relu"]


def conv3d_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3x3 Conv3d (no bias) -> BatchNorm3d -> ReLU with "same" padding.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.

    Returns:
        The three-layer ``nn.Sequential``.
    """
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm3d(out_ch), nn.ReLU()
    )


class ResBlock3d(nn.Module):
    """3-D residual block: conv-BN-ReLU, conv-BN, identity add, ReLU.

    Args:
        channels: Input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3d_bn_relu(channels, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + x)


class StereoNetLite(nn.Module):
    """PSMNet-style stereo matching network.

    1. A shared 2-D feature extractor (two stride-2 conv-BN-ReLU layers, one residual
       BasicBlock and a 1x1 conv, all at 1/4 resolution with ``2 * width`` channels) is
       applied to the left and to the right image.
    2. A concatenation cost volume ``[B, 2F, D, H/4, W/4]`` with ``D = max_disp // 4``
       is built by shifting the right features by ``0..D-1`` quarter-resolution pixels
       (zero padding; ``torch.cat`` over channels, ``torch.stack`` over disparities).
    3. A 3-D aggregation network: two Conv3d-BN-ReLU layers, a 3-D residual block, one more
       Conv3d-BN-ReLU and a final Conv3d to one channel (:attr:`classifier`).
    4. The score volume is trilinearly upsampled to ``[max_disp, H, W]`` and soft-argmax
       regression (softmax over disparities, expectation of ``0..max_disp-1``) gives the
       disparity.

    ``forward(left, right)`` returns the left-view disparity in pixels, shape ``[B, H, W]``
    (no channel dimension), in ``[0, max_disp - 1]``; ``left(x) ~ right(x - disparity)``.

    Args:
        max_disp: Number of disparity hypotheses at full resolution (multiple of 4, >= 8).
        width: Base width; features have ``2 * width`` channels, the 3-D network too.
        in_chans: Image channels.

    Raises:
        ValueError: If ``max_disp`` is not a multiple of 4 or is smaller than 8.
    """

    def __init__(self, max_disp: int = 16, width: int = 8, in_chans: int = 3) -> None:
        super().__init__()
        if max_disp < 8 or max_disp % 4 != 0:
            raise ValueError(f"max_disp must be a multiple of 4 and >= 8, got {max_disp}")
        self.max_disp = max_disp
        self.num_levels = max_disp // 4
        feat = 2 * width
        self.feature = nn.Sequential(
            conv_bn_relu(in_chans, width, 3, stride=2),
            conv_bn_relu(width, feat, 3, stride=2),
            BasicBlock(feat, feat),
            nn.Conv2d(feat, feat, 1, bias=False),
        )
        c3 = 2 * width
        self.aggregate = nn.Sequential(
            conv3d_bn_relu(2 * feat, c3),
            conv3d_bn_relu(c3, c3),
            ResBlock3d(c3),
            conv3d_bn_relu(c3, c3),
        )
        self.classifier = nn.Conv3d(c3, 1, 3, 1, 1, bias=False)
        self.register_buffer(
            "disp_values",
            torch.arange(max_disp, dtype=torch.float32).view(1, max_disp, 1, 1),
            persistent=False,
        )

    def cost_volume(self, left_feat: torch.Tensor, right_feat: torch.Tensor) -> torch.Tensor:
        """Concatenation cost volume ``[B, 2F, D, h, w]``.

        Level ``d`` pairs left feature ``x`` with right feature ``x - d`` (zeros where
        ``x - d < 0``).

        Args:
            left_feat: Left features ``[B, F, h, w]``.
            right_feat: Right features ``[B, F, h, w]``.

        Returns:
            The cost volume.
        """
        levels = self.num_levels
        w = left_feat.shape[-1]
        padded = F.pad(right_feat, (levels - 1, 0))
        slices = []
        for d in range(levels):
            start = levels - 1 - d
            shifted = padded[:, :, :, start : start + w]
            slices.append(torch.cat([left_feat, shifted], dim=1))
        return torch.stack(slices, dim=2)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Return the disparity map ``[B, H, W]`` of the left view."""
        h, w = left.shape[-2:]
        volume = self.cost_volume(self.feature(left), self.feature(right))
        score = self.classifier(self.aggregate(volume))
        score = F.interpolate(
            score, size=(self.max_disp, h, w), mode="trilinear", align_corners=False
        )
        prob = F.softmax(score.squeeze(1), dim=1)
        return torch.sum(prob * self.disp_values, dim=1)
