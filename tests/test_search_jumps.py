"""A MACs target that some allocation reaches is reached, even when one coupled group moves
in steps larger than the tolerance (issue 25, kind 2: smp's FPN, whose summed pyramid levels
sit behind GroupNorms of 32 groups and move 32 channels at a time); a refusal's suggestion is
one that works."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kcp_plugin import TargetUnreachable, prune


class PyramidNet(nn.Module):
    """Three backbone stages whose lateral 1x1 convs are summed (one coupled group of 64
    channels) and followed by GroupNorm(16 groups) and a 3x3 conv at full resolution."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.ReLU())
        self.lateral = nn.ModuleList(nn.Conv2d(24, 64, 1) for _ in range(3))
        self.norm = nn.GroupNorm(16, 64)
        self.seg = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(16, 64),
                                 nn.ReLU())
        self.head = nn.Conv2d(64, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.down1(a)
        c = self.down2(b)
        p = self.lateral[0](a) + self.lateral[1](b) + self.lateral[2](c)
        return self.head(self.seg(torch.relu(self.norm(p))))


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return PyramidNet().eval(), torch.randn(1, 3, 16, 16)


def test_a_target_behind_a_jumping_group_is_reached():
    model, x = _net()
    report = prune(model, x, "l1", target_macs_ratio=0.5, round_to=1, progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02
    assert model.norm.num_channels % 16 == 0


def test_a_refusal_suggests_a_tolerance_that_works():
    model, x = _net()
    with pytest.raises(TargetUnreachable, match=r"macs_tolerance=([0-9.]+) accepts it") as info:
        prune(model, x, "l1", target_macs_ratio=0.5, round_to=1, macs_tolerance=1e-4,
              progress=False)
    message = str(info.value)
    assert "lower round_to" not in message and "global_pruning" not in message
    import re

    tolerance = float(re.search(r"macs_tolerance=([0-9.]+) accepts it", message).group(1))
    report = prune(model, x, "l1", target_macs_ratio=0.5, round_to=1, macs_tolerance=tolerance,
                   progress=False)
    assert abs(report.macs_ratio - 0.5) <= tolerance
