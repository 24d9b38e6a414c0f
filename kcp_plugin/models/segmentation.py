"""Small semantic-segmentation networks that train on a CPU in minutes.

Both models are plain ``nn.Module`` s built from Conv2d / BatchNorm2d / ReLU, residual adds,
channel concatenation and bilinear interpolation only, with no data-dependent Python control
flow, so torch-pruning can trace and prune them. ``forward`` returns logits
``[B, num_classes, H, W]`` at the input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ASPP", "BasicBlock", "DeepLabV3Lite", "FCNLite", "conv_bn_relu"]


def conv_bn_relu(
    in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> ReLU with "same" padding.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        kernel_size: Odd kernel size.
        stride: Convolution stride.
        dilation: Convolution dilation.

    Returns:
        The three-layer ``nn.Sequential``.
    """
    pad = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a residual add.

    A 1x1 projection (conv + BN) is used on the shortcut whenever the stride or the
    channel count changes.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the first conv (and of the projection).
        dilation: Dilation of both 3x3 convs.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


def _make_stage(in_ch: int, out_ch: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride, dilation)]
    layers += [BasicBlock(out_ch, out_ch, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3).

    Branches: a 1x1 conv, one dilated 3x3 conv per rate and an image-pooling branch
    (global average pool -> 1x1 conv -> ReLU -> bilinear upsample); the branch outputs are
    concatenated and projected by a 1x1 conv-BN-ReLU. The pooling branch has a biased conv
    and no BatchNorm so that it works with batch size 1 in training mode (BN over a 1x1 map
    with one sample is undefined).

    Args:
        in_ch: Input channels.
        out_ch: Channels of every branch and of the output.
        rates: Dilation rates of the 3x3 branches.
    """

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int] = (2, 4, 6)) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_ch, out_ch, 1)]
        branches += [conv_bn_relu(in_ch, out_ch, 3, dilation=int(r)) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)
        self.pool_relu = nn.ReLU()
        self.project = conv_bn_relu(out_ch * (len(branches) + 1), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply all branches, concatenate and project."""
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_relu(self.pool_conv(self.pool(x)))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Lite(nn.Module):
    """DeepLabV3 with a narrow ResNet-18-like backbone.

    Backbone: 3x3 stride-2 stem, then four stages of two BasicBlocks each with widths
    ``(w, 2w, 4w, 8w)``. Stages 2 and 3 downsample by 2; stage 4 keeps the resolution and
    uses dilation 2 (output stride 8) or downsamples by 2 (output stride 16). Head: ASPP
    with ``aspp_channels`` channels, a 3x3 conv-BN-ReLU and a final 1x1 classifier conv
    (:attr:`classifier`), then bilinear upsampling to the input size.

    Args:
        num_classes: Number of output classes.
        width: Base width ``w`` of the backbone.
        in_chans: Input image channels.
        output_stride: 8 (dilated last stage) or 16.
        atrous_rates: Dilation rates of the ASPP 3x3 branches; the defaults suit the small
            (8x8 for 64x64 inputs) feature maps of the benchmark.
        aspp_channels: Channels of the ASPP branches; defaults to ``4 * width``.
    """

    def __init__(
        self,
        num_classes: int,
        width: int = 16,
        in_chans: int = 3,
        output_stride: int = 8,
        atrous_rates: Sequence[int] = (2, 4, 6),
        aspp_channels: int | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        w = width
        self.stem = conv_bn_relu(in_chans, w, 3, stride=2)
        self.layer1 = _make_stage(w, w, 2, stride=1, dilation=1)
        self.layer2 = _make_stage(w, 2 * w, 2, stride=2, dilation=1)
        self.layer3 = _make_stage(2 * w, 4 * w, 2, stride=2, dilation=1)
        if output_stride == 8:
            self.layer4 = _make_stage(4 * w, 8 * w, 2, stride=1, dilation=2)
        else:
            self.layer4 = _make_stage(4 * w, 8 * w, 2, stride=2, dilation=1)
        a = aspp_channels if aspp_channels is not None else 4 * w
        self.aspp = ASPP(8 * w, a, atrous_rates)
        self.head = conv_bn_relu(a, a, 3)
        self.classifier = nn.Conv2d(a, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return per-pixel class logits ``[B, num_classes, H, W]``."""
        size = x.shape[-2:]
        f = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        out = self.classifier(self.head(self.aspp(f)))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


class FCNLite(nn.Module):
    """Plain VGG-like fully convolutional network.

    Four stages of two 3x3 conv-BN-ReLU layers with widths ``(w, 2w, 4w, 8w)``, separated
    by 2x2 max-pooling (output stride 8); an FCN head (3x3 conv-BN-ReLU to ``2w``
    channels, dropout) and a final 1x1 classifier conv (:attr:`classifier`), then bilinear
    upsampling to the input size.

    Args:
        num_classes: Number of output classes.
        width: Base width ``w``.
        in_chans: Input image channels.
        dropout: Dropout probability in the head.
    """

    def __init__(
        self, num_classes: int, width: int = 16, in_chans: int = 3, dropout: float = 0.1
    ) -> None:
        super().__init__()
        w = width
        chans = (w, 2 * w, 4 * w, 8 * w)
        layers: list[nn.Module] = []
        prev = in_chans
        for i, c in enumerate(chans):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [conv_bn_relu(prev, c, 3), conv_bn_relu(c, c, 3)]
            prev = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(conv_bn_relu(prev, 2 * w, 3), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return per-pixel class logits ``[B, num_classes, H, W]``."""
        size = x.shape[-2:]
        out = self.classifier(self.head(self.features(x)))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
