"""Frozen norms, frozen parameters and per-channel tensors a layer owns are pruned with their
channels (issue 25, kind 3): before, such backbones pruned nothing and said nothing."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcp_plugin import load_pruned, prune, save_pruned
from kcp_plugin.channelwise import channelwise_pruners, companions


class FrozenNorm(nn.Module):
    """A frozen batch norm of another library (transformers' DetrFrozenBatchNorm2d's shape):
    per-channel buffers, no parameters."""

    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class GainConv(nn.Conv2d):
    """A weight-standardized conv with a per-filter gain (timm's ScaledStdConv2d's kind)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.register_buffer("offset", torch.zeros(self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, eps=1e-6).reshape_as(self.weight) * self.gain
        out = F.conv2d(x, w, self.bias, self.stride, self.padding)
        return out + self.offset[None, :, None, None]


def _backbone(conv=nn.Conv2d, norm=FrozenNorm, freeze: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    c_in = 3
    for c in (16, 32, 32):
        layers += [conv(c_in, c, 3, padding=1), norm(c), nn.ReLU()]
        c_in = c
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
    if freeze:
        net.requires_grad_(False)
    return net.eval()


def test_a_frozen_backbone_with_frozen_norms_is_pruned(tmp_path):
    model, x = _backbone(), torch.randn(2, 3, 16, 16)
    report = prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    assert model[0].out_channels == 8 and model[1].weight.shape == (8,)
    assert report.macs_ratio < 0.4 and not report.auto_protected
    assert not any(p.requires_grad for p in model.parameters())  # still frozen
    save_pruned(model, tmp_path / "m.pt")
    again = load_pruned(_backbone, tmp_path / "m.pt", x)
    assert torch.equal(again(x), model(x))


def test_a_macs_target_is_reached_through_frozen_norms():
    model, x = _backbone(), torch.randn(2, 3, 16, 16)
    report = prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.05


def test_torchvision_frozen_batchnorm_resnet_prunes_and_keeps_the_frozen_flags():
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("conv1", "layer1")))
    x = torch.randn(1, 3, 64, 64)
    report = prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    assert model.layer1[0].conv1.out_channels == 32
    assert report.macs_ratio < 0.35 and not report.auto_protected
    assert not model.layer1[0].conv1.weight.requires_grad
    assert model.layer2[0].conv1.weight.requires_grad


def test_per_channel_tensors_a_conv_owns_follow_its_filters(tmp_path):
    model, x = _backbone(conv=GainConv, norm=nn.BatchNorm2d, freeze=False), torch.randn(2, 3, 8, 8)
    assert companions(model[0]) == ["gain", "offset"]
    with torch.no_grad():
        model[0].offset.copy_(torch.arange(16.0))
    report = prune(model, x, "l2", pruning_ratio=0.5, progress=False)
    assert model[0].gain.shape == (8, 1, 1, 1) and model[0].offset.shape == (8,)
    assert report.macs_ratio < 0.4 and not report.auto_protected
    kept = model[0].offset.long()  # the offsets held their channel indices
    assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == 8
    save_pruned(model, tmp_path / "m.pt")
    again = load_pruned(lambda: _backbone(conv=GainConv, norm=nn.BatchNorm2d, freeze=False),
                        tmp_path / "m.pt", x)
    assert torch.equal(again(x), model(x))


def test_only_types_whose_every_instance_is_per_channel_get_the_pruner():
    class Odd(nn.Module):
        def __init__(self, sizes):
            super().__init__()
            for i, s in enumerate(sizes):
                self.register_buffer(f"b{i}", torch.zeros(s))

        def forward(self, x):
            return x

    net = nn.Sequential(Odd([4, 4]), Odd([4, 5]), FrozenNorm(4))
    assert set(channelwise_pruners(net)) == {FrozenNorm}


def test_timm_nf_resnet_prunes_its_bottlenecks():
    import timm
    model = timm.create_model("nf_resnet26").eval()
    x = torch.randn(1, 3, 64, 64)
    report = prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    conv = model.stages[0][0].conv2
    assert conv.out_channels == 32 and conv.gain.shape[0] == 32
    assert report.macs_ratio < 0.35
