"""A MACs target that some allocation reaches is reached, even when one coupled group moves
in steps larger than the tolerance (issue 25, kind 2: smp's FPN, whose summed pyramid levels
sit behind GroupNorms of 32 groups and move 32 channels at a time); a refusal's suggestion is
one that works."""

from __future__ import annotations

import copy
import warnings

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


# ------------------------------------------------------------------ out of reach
def _chain() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 4, 1)).eval()
    return model, torch.randn(1, 3, 16, 16)


def test_out_of_reach_suggests_a_max_pruning_ratio_only_when_it_was_tried_and_works():
    model, x = _chain()
    with pytest.raises(TargetUnreachable, match=r"max_pruning_ratio=0\.95 keeps [0-9.]+ "
                       r"\(tried\): raise max_pruning_ratio") as info:
        prune(model, x, "l1", target_macs_ratio=0.1, max_pruning_ratio=0.5, progress=False)
    assert "protect fewer" not in str(info.value)
    report = prune(model, x, "l1", target_macs_ratio=0.1, max_pruning_ratio=0.95,
                   progress=False)
    assert abs(report.macs_ratio - 0.1) <= 0.02


def test_out_of_reach_behind_protected_layers_names_the_lowest_target_reached():
    # conv 4 keeps both its widths (its input is conv 2's output): however hard the rest is
    # pruned, its MACs stay
    model, x = _chain()
    with pytest.raises(TargetUnreachable, match=r"lowest target reached is "
                       r"target_macs_ratio=([0-9.]+) \(with max_pruning_ratio=([0-9.]+)\)"
                       ) as info:
        prune(model, x, "l1", target_macs_ratio=0.3, ignored_layers=["2", "4"], progress=False)
    message = str(info.value)
    assert "raise max_pruning_ratio" not in message and "protect fewer" not in message
    import re

    lowest, ratio = map(float, re.search(r"target_macs_ratio=([0-9.]+) \(with "
                                         r"max_pruning_ratio=([0-9.]+)\)", message).groups())
    assert 0.3 < lowest < 1.0
    report = prune(model, x, "l1", target_macs_ratio=lowest, ignored_layers=["2", "4"],
                   max_pruning_ratio=ratio, progress=False)
    assert abs(report.macs_ratio - lowest) <= 0.02


def test_smp_fpn_reaches_the_target_where_it_was_refused():
    # the issue's input: smp's FPN on mobilenet_v2 at round_to=1 was refused ("could not
    # reach target_macs_ratio=0.5 within 0.02: the closest setting keeps 0.5683")
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.FPN("mobilenet_v2", encoder_weights=None, classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    shape = model(x).shape
    report = prune(model, x, "kcp", target_macs_ratio=0.5, round_to=1, progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02
    with torch.no_grad():
        out = model(x)
    assert out.shape == shape and torch.isfinite(out).all()


def test_default_cap_is_raised_to_the_tried_ratio_that_reaches_the_target():
    """A newcomer's nest / swin_v2_t: refused at the default max_pruning_ratio=0.9, told that
    0.95 reaches the target (tried), and made to run the whole search again. With the cap left
    at its default the search now goes on to 0.95 and says so; a cap the user gives is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    kwargs = dict(target_macs_ratio=0.07, round_to=1, ignored_layers=["2"], progress=False)
    # conv 2 keeps its outputs: the MACs fall only linearly with the ratio (0.103 at 0.9)
    with pytest.raises(TargetUnreachable, match=r"\(tried\): raise max_pruning_ratio"):
        prune(copy.deepcopy(model), x, "l1", max_pruning_ratio=0.9, **kwargs)
    with pytest.warns(UserWarning, match=r"needs more than the default max_pruning_ratio=0\.9 "
                      r"\(which keeps 0\.10[0-9] of the MACs\): layers lose up to 0\.95"):
        report = prune(model, x, "l1", **kwargs)
    assert abs(report.macs_ratio - 0.07) <= 0.02
    assert model[0].out_channels < 64 * (1 - 0.9)  # pruned past the default cap


def test_a_raised_cap_holds_for_the_final_prune_and_is_announced_only_on_success():
    """The trials after the default cap was raised ran under 0.95; the final prune ran under
    the ratio found (0.905), so a per-layer ratio above it was cut back differently and the
    result missed the target unchecked (0.094 for 0.065 +- 0.01). And the warning came before
    the search ended, also where the search then refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(UserWarning, match="needs more than the default max_pruning_ratio"):
        report = prune(model, x, "l1", target_macs_ratio=0.065, macs_tolerance=0.01, round_to=1,
                       ignored_layers=["2"], pruning_ratio_dict={"4": 0.99}, progress=False)
    assert abs(report.macs_ratio - 0.065) <= 0.01
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 1)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TargetUnreachable, match="channel groups move in steps too coarse"):
            prune(model, x, "l1", target_macs_ratio=0.09, macs_tolerance=0.002, round_to=1,
                  ignored_layers=["2"], progress=False)
    assert not [w for w in caught if "needs more than the default" in str(w.message)]
