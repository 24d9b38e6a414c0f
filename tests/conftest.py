"""Small models shared by the core tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


class ResBlockNet(nn.Module):
    """conv-bn-relu stem, two residual blocks sharing the stem's channels, classifier head."""

    def __init__(self, width: int = 16, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                                nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                nn.BatchNorm2d(width))
        self.b2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1),
                                nn.BatchNorm2d(2 * width), nn.ReLU(),
                                nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(x + self.b2(x))
        return self.fc(self.pool(x).flatten(1))


class TinySeg(nn.Module):
    """Encoder with depthwise + grouped convs, transposed-conv decoder, 1x1 class conv."""

    def __init__(self, num_classes: int = 4, w: int = 16):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 1), nn.GroupNorm(4, 2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=4), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.up = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(self.enc(x))))


class Tiny3D(nn.Module):
    """A cost-volume style 3-D aggregation: Conv3d stack with a residual and a 1-channel output."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv3d(4, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv3d(w, w, 3, padding=1), nn.BatchNorm3d(w))
        self.out = nn.Conv3d(w, 1, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        y = torch.relu(y + self.c2(y))
        return self.out(y).squeeze(1)


@pytest.fixture
def resnet_like():
    torch.manual_seed(0)
    return ResBlockNet().eval()


@pytest.fixture
def image():
    torch.manual_seed(1)
    return torch.randn(2, 3, 16, 16)


class PartialConv(nn.Module):
    """FasterNet's partial conv: split by two stored sizes, the first quarter through a 3x3
    conv, the rest passed on."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim_conv3 = dim // 4
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)

def assert_masked_dense_equals(dense: nn.Module, pruned: nn.Module, x: torch.Tensor) -> int:
    """``pruned`` computes what ``dense`` computes with the removed channels zeroed: the rows of
    every conv / linear / batch norm that pruning dropped, found from each parameter's lineage
    (``kcp_plugin.tracking``; prune under ``track_pruning``), so layers that several groups
    prune are masked correctly. Exact only where a zeroed channel stays zero (batch norms, not
    layer norms). Returns the number of channels masked (asserted > 0)."""
    from kcp_plugin.tracking import lineage

    layers, masked = dict(dense.named_modules()), 0
    with torch.no_grad():
        for name, m in pruned.named_modules():
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear,
                                  nn.modules.batchnorm._BatchNorm)):
                continue
            d = layers[name]
            kept = torch.arange(d.weight.shape[0])
            for _, dim, keep in lineage(m.weight):
                if dim == 0:
                    kept = kept[keep]
            drop = torch.ones(d.weight.shape[0], dtype=torch.bool)
            drop[kept] = False
            masked += int(drop.sum())
            d.weight[drop] = 0
            if d.bias is not None:
                d.bias[drop] = 0
        assert masked, "nothing was pruned"
        torch.testing.assert_close(pruned(x), dense(x), rtol=1e-4, atol=1e-5)
    return masked
