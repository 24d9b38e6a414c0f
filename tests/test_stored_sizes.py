"""Split / slice sizes stored on a module follow pruning (kcp_plugin.stored_sizes).

Each small model mimics a timm pattern that was refused or protected before: MixNet's
``MixedConv2d`` (``torch.split(x, self.splits, 1)``), ReXNet's bottleneck (the shortcut added
into ``x[:, 0:self.in_channels]``), DPN's dual-path block (two tensors sliced at one stored
width), FasterNet's partial conv (``split(x, [self.dim_conv3, self.dim_untouched])``).
The pruned model must compute what the dense model computes with the removed channels zeroed;
what cannot follow (an ambiguous attribute, one that also sizes something else) is protected
with the attribute named.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import PartialConv, assert_masked_dense_equals

import kcp_plugin
from kcp_plugin.depgraph import DependencyGraph
from kcp_plugin.plan import apply_plan, get_plan

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _conv(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2), nn.BatchNorm2d(cout), nn.SiLU())


def _split_channels(channels, n):
    split = [channels // n] * n
    split[0] += channels - sum(split)
    return split


class Mixed(nn.Module):
    """MixedConv2d's pattern: split by a stored list of sizes, a conv per part, cat."""

    def __init__(self, cin, cout, kernels=(3, 5, 7), depthwise=False, as_tuple=False):
        super().__init__()
        ins, outs = _split_channels(cin, len(kernels)), _split_channels(cout, len(kernels))
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, k, 1, k // 2, groups=i if depthwise else 1)
            for i, o, k in zip(ins, outs, kernels))
        self.splits = tuple(ins) if as_tuple else ins

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)


class MixNetLike(nn.Module):
    """A MixNet block: mixed pointwise, mixed depthwise (unequal parts), mixed pointwise."""

    def __init__(self, as_tuple=False):
        super().__init__()
        self.stem = _conv(3, 24)
        self.pw = Mixed(24, 40, (1, 1))
        self.bn1 = nn.BatchNorm2d(40)
        self.dw = Mixed(40, 40, (3, 5, 7), depthwise=True, as_tuple=as_tuple)
        self.bn2 = nn.BatchNorm2d(40)
        self.pwl = Mixed(40, 24, (1, 1))
        self.bn3 = nn.BatchNorm2d(24)
        self.head = nn.Conv2d(24, 10, 1)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.pw(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        y = self.bn3(self.pwl(y))
        return self.head(x + y).mean((2, 3))


class Bottleneck(nn.Module):
    """ReXNet's LinearBottleneck: the shortcut is added into a slice of a wider output."""

    def __init__(self, cin, cout):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.use_shortcut = True
        self.exp = _conv(cin, cin * 3, 1)
        self.dw = _conv(cin * 3, cin * 3, 3)
        self.pwl = nn.Sequential(nn.Conv2d(cin * 3, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x
        x = self.pwl(self.dw(self.exp(x)))
        if self.use_shortcut:
            x = torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]], dim=1)
        return x


class ReXNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 16)
        self.blocks = nn.Sequential(Bottleneck(16, 24), Bottleneck(24, 32), Bottleneck(32, 40))
        self.head = nn.Conv2d(40, 10, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x))).mean((2, 3))


class DualPath(nn.Module):
    """DPN's pattern: a projection and a body output, both cut at one stored width; the
    first parts are added (residual path), the rest concatenated (dense path)."""

    def __init__(self, cin, c, inc):
        super().__init__()
        self.num_1x1_c = c
        self.proj = _conv(cin, c + inc, 1)
        self.body = nn.Sequential(_conv(cin, 32), _conv(32, c + inc, 1))

    def forward(self, x):
        x_s = self.proj(x)
        y = self.body(x)
        resid = x_s[:, :self.num_1x1_c] + y[:, :self.num_1x1_c]
        return torch.cat([resid, x_s[:, self.num_1x1_c:], y[:, self.num_1x1_c:]], 1)


class DPNLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 16)
        self.a = DualPath(16, 24, 8)
        self.b = DualPath(40, 32, 8)
        self.head = nn.Conv2d(48, 10, 1)

    def forward(self, x):
        return self.head(self.b(self.a(self.stem(x)))).mean((2, 3))


class FasterNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 32)
        self.spatial = PartialConv(32)
        self.mlp = nn.Sequential(_conv(32, 64, 1), nn.Conv2d(64, 32, 1))
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.mlp(self.spatial(x))).mean((2, 3))


def _masked_equals_pruned(model, x, **kwargs):
    """Prune ``model`` and compare it with the dense model whose removed output channels are
    zeroed (conftest.assert_masked_dense_equals)."""
    torch.manual_seed(1)
    for m in model.modules():  # BN statistics that do not hide a misplaced channel
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    dense = copy.deepcopy(model)
    report = kcp_plugin.prune(model, x, "l1", progress=False, **kwargs)
    assert_masked_dense_equals(dense, model, x)
    return report


def _round_trip(model, builder, x, tmp_path):
    path = tmp_path / "pruned.pt"
    kcp_plugin.save_pruned(model, path)
    loaded = kcp_plugin.load_pruned(builder, path, x).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    return loaded


# ---------------------------------------------------------------------- bindings
def test_stored_sizes_are_found_by_tracing_not_by_class():
    model = MixNetLike().eval()
    graph = DependencyGraph().build_dependency(model, X)
    found = sorted(s.label() for node in graph.module2node.values()
                   if (op := graph.stored_sizes.bound(node)) for s in op.slots.values())
    assert found == ["dw.splits", "pw.splits", "pwl.splits"]
    assert graph.fixed_splits == []  # unequal, but stored: they follow pruning

    model = ReXNetLike().eval()
    graph = DependencyGraph().build_dependency(model, X)
    slots = sorted((s.label(), role) for node in graph.module2node.values()
                   if (op := graph.stored_sizes.bound(node)) for role, s in op.slots.items())
    assert slots == [(f"blocks.{i}.in_channels", role) for i in range(3)
                     for role in ("end", "start")]


# ---------------------------------------------------------------------- pruned correctly
@pytest.mark.parametrize("kwargs", [dict(pruning_ratio=0.3),
                                    dict(pruning_ratio=0.4, iterative_steps=3),
                                    dict(target_macs_ratio=0.5)],
                         ids=["ratio", "3-steps", "macs"])
@pytest.mark.parametrize("builder", [MixNetLike, ReXNetLike, DPNLike, FasterNetLike],
                         ids=["mixnet", "rexnet", "dpn", "fasternet"])
def test_pruned_model_computes_what_the_masked_dense_model_computes(builder, kwargs, tmp_path):
    torch.manual_seed(0)
    model = builder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing protected, nothing refused
        report = _masked_equals_pruned(model, X, **kwargs)
    if "target_macs_ratio" in kwargs:
        assert abs(report.macs_ratio - 0.5) <= 0.02
    attrs = get_plan(model)["attrs"]
    assert attrs, "the stored sizes pruning set are in the plan"
    modules = dict(model.named_modules())
    for name, values in attrs.items():
        for attr, value in values.items():
            assert getattr(modules[name], attr) == value
    _round_trip(model, builder, X, tmp_path)


def test_split_sizes_match_the_pruned_convs():
    torch.manual_seed(0)
    model = MixNetLike(as_tuple=True).eval()
    kcp_plugin.prune(model, X, "l1", pruning_ratio=0.4, progress=False)
    for mixed in (model.pw, model.dw, model.pwl):
        assert list(mixed.splits) == [c.in_channels for c in mixed.convs]
    assert isinstance(model.dw.splits, tuple)  # the attribute keeps its type
    fresh = MixNetLike(as_tuple=True).eval()
    apply_plan(fresh, get_plan(model), X)  # a replay sets the same sizes, as a tuple again
    assert fresh.dw.splits == model.dw.splits and isinstance(fresh.dw.splits, tuple)


def test_rexnet_slice_widths_follow_the_shortcut():
    torch.manual_seed(0)
    model = ReXNetLike().eval()
    kcp_plugin.prune(model, X, "l1", pruning_ratio=0.5, progress=False)
    widths = [model.stem[0].out_channels] + [b.pwl[0].out_channels for b in model.blocks]
    assert [b.in_channels for b in model.blocks] == widths[:-1]
    assert any(b.in_channels < w for b, w in zip(model.blocks, (16, 24, 32)))


# ---------------------------------------------------------------------- what cannot follow
class Ambiguous(nn.Module):
    """Split sizes equal to two list attributes, copied first: which one sizes the split
    cannot be told."""

    def __init__(self):
        super().__init__()
        self.splits, self.out_splits = [8, 16], [8, 16]
        self.body = _conv(3, 24)
        self.p, self.q = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        sizes = list(self.splits)
        p, q = torch.split(self.body(x), sizes, 1)
        return self.head(torch.cat([self.p(p), self.q(q)], 1)).mean((2, 3))


class OffChannels(nn.Module):
    """One attribute sizes a channel slice and a spatial crop: it cannot follow pruning."""

    def __init__(self):
        super().__init__()
        self.k = 8
        self.body = _conv(3, 24)
        self.head = nn.Conv2d(24, 10, 1)

    def forward(self, x):
        y = self.body(x)[:, :, :self.k]
        y = torch.cat([y[:, :self.k] * 2, y[:, self.k:]], 1)
        return self.head(y).mean((2, 3))


class TwoTensors(nn.Module):
    """One attribute cuts two independent tensors: pruning changes them differently."""

    def __init__(self):
        super().__init__()
        self.k = 8
        self.a, self.b = _conv(3, 16), _conv(3, 16)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.cat([a[:, :self.k], b[:, self.k:]], 1)
        return self.head(y).mean((2, 3))


@pytest.mark.parametrize("builder,attr", [
    (Ambiguous, "splits, out_splits"), (OffChannels, "k"), (TwoTensors, "k")],
    ids=["ambiguous", "off-channels", "two-tensors"])
def test_what_cannot_follow_is_kept_and_named(builder, attr):
    torch.manual_seed(0)
    model = builder().eval()
    dense = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"kept \d+ channel group") as record:
        kcp_plugin.prune(model, X, "l1", pruning_ratio=0.3, progress=False)
    text = " ".join(str(w.message) for w in record)
    assert attr in text, text
    with torch.no_grad():  # what is kept is not pruned: the sliced channels compute the same
        out = model(X)
    assert out.shape == dense(X).shape and torch.isfinite(out).all()
    if builder is Ambiguous:
        assert model.splits == [8, 16] and model.body[0].out_channels == 24
    else:
        assert model.k == 8


# ---------------------------------------------------------------------- timm's models
TIMM_MODELS = ["mixnet_s", "rexnet_100", "dpn48b"]  # refused before, as SKNet (below) was


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_with_stored_sizes_reach_the_target_and_reload(name, tmp_path):
    import timm

    from kcp_plugin.integrations.timm.support import check_supported

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    check_supported(model)  # no UnsupportedModelError any more
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kcp_plugin kept")  # nothing protected
        report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02
    assert get_plan(model)["attrs"]  # the stored sizes that changed
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    _round_trip(model, lambda: timm.create_model(name, num_classes=10), x, tmp_path)


def test_sknet_split_width_follows_and_only_its_path_attention_is_kept(tmp_path):
    # SelectiveKernel splits by self.in_channels // self.num_paths: the stored total follows
    # (the parts stay equal); its attention over stacked paths (view(B, paths, C, H, W)) is
    # what the safety net keeps
    import timm

    torch.manual_seed(0)
    model = timm.create_model("skresnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="kept"):
        report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02
    assert report.auto_protected
    assert all(r["root"].endswith("attn.fc_select") for r in report.auto_protected)
    sk = model.layer2[1].conv1
    assert sk.in_channels == sum(p.conv.in_channels for p in sk.paths) < 128
    _round_trip(model, lambda: timm.create_model("skresnet18", num_classes=10), x, tmp_path)


@pytest.mark.parametrize("name", [*TIMM_MODELS, "skresnet18"])
def test_timm_models_with_stored_sizes_compute_the_masked_dense_model(name):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum recursive depth")  # upstream's
        _masked_equals_pruned(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.3)
