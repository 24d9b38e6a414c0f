"""Tests for the benchmark models: shapes, registry, prunability and trainability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp

from kcp_plugin.data import make_digits_splits, make_segmentation_dataset, make_stereo_dataset
from kcp_plugin.models import (
    DeepLabV3Lite,
    StereoNetLite,
    build_model,
    cifar_resnet,
    example_inputs,
    final_layer,
    list_models,
    model_task,
)

NAMES = ["deeplabv3_lite", "fcn_lite", "stereo_lite", "resnet20", "resnet56"]


def _run(model: torch.nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return model(*x) if isinstance(x, tuple) else model(x)


def _expected_shape(name: str, batch: int, size: tuple[int, int]) -> tuple[int, ...]:
    task = model_task(name)
    if task == "segmentation":
        return (batch, 5, *size)
    if task == "stereo":
        return (batch, *size)
    return (batch, 10)


def test_registry_names_and_errors() -> None:
    assert list_models() == sorted(NAMES)
    with pytest.raises(ValueError) as info:
        build_model("resnet18")
    for name in NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError):
        example_inputs("nope")
    with pytest.raises(ValueError):
        build_model("resnet20", depth=32)


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = example_inputs(name, batch=2)
    size = tuple(x[0].shape[-2:]) if isinstance(x, tuple) else tuple(x.shape[-2:])
    with torch.no_grad():
        out = _run(model, x)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == _expected_shape(name, 2, size)
    assert torch.isfinite(out).all()


def test_custom_sizes_and_options() -> None:
    seg = build_model("deeplabv3_lite", num_classes=3, width=8, output_stride=16).eval()
    with torch.no_grad():
        assert seg(torch.randn(1, 3, 48, 40)).shape == (1, 3, 48, 40)
    fcn = build_model("fcn_lite", num_classes=7, width=8, in_chans=1).eval()
    with torch.no_grad():
        assert fcn(example_inputs("fcn_lite", size=32, in_chans=1)).shape == (1, 7, 32, 32)
    net = cifar_resnet(depth=8, num_classes=4, width=4, in_chans=1).eval()
    with torch.no_grad():
        assert net(torch.randn(3, 1, 16, 16)).shape == (3, 4)
    with pytest.raises(ValueError):
        cifar_resnet(depth=21)
    with pytest.raises(ValueError):
        StereoNetLite(max_disp=10)
    with pytest.raises(ValueError):
        DeepLabV3Lite(5, output_stride=4)


def test_deeplab_trains_with_batch_size_one() -> None:
    # The ASPP image-pooling branch has no BatchNorm, so batch 1 works in train mode.
    model = build_model("deeplabv3_lite", width=8).train()
    out = model(torch.randn(1, 3, 32, 32))
    out.mean().backward()
    assert out.shape == (1, 5, 32, 32)


def test_stereo_cost_volume_layout() -> None:
    model = StereoNetLite(max_disp=16, width=4)
    left = torch.randn(2, 3, 5, 9)
    right = torch.randn(2, 3, 5, 9)
    vol = model.cost_volume(left, right)
    assert vol.shape == (2, 6, 4, 5, 9)
    for d in range(4):
        assert torch.equal(vol[:, :3, d], left)
        assert torch.equal(vol[:, 3:, d, :, d:], right[..., : 9 - d])
        assert not vol[:, 3:, d, :, :d].any()


def test_stereo_output_is_soft_argmin_in_range() -> None:
    model = StereoNetLite(max_disp=16, width=4).eval()
    with torch.no_grad():
        disp = model(torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64))
    assert disp.shape == (2, 32, 64)
    assert float(disp.min()) >= 0.0 and float(disp.max()) <= 15.0


@pytest.mark.parametrize("name", NAMES)
def test_torch_pruning_prunes_30_percent(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = example_inputs(name)
    with torch.no_grad():
        before = _run(model, x)
    n_params = sum(p.numel() for p in model.parameters())
    head = final_layer(model)
    head_out = head.weight.shape[0]
    forward_fn = (lambda m, inp: m(*inp)) if isinstance(x, tuple) else None

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, forward_fn=forward_fn)
    assert len(list(dg.get_all_groups(ignored_layers=[head]))) > 3

    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(),
        pruning_ratio=0.3,
        ignored_layers=[head],
        forward_fn=forward_fn,
    )
    pruner.step()
    with torch.no_grad():
        after = _run(model, x)
    assert after.shape == before.shape
    assert torch.isfinite(after).all()
    assert head.weight.shape[0] == head_out
    n_after = sum(p.numel() for p in model.parameters())
    # 30% of channels on both sides of most convs: roughly half of the weights remain.
    assert n_after < 0.75 * n_params
    # The pruned model still trains.
    model.train()
    _run(model, example_inputs(name, batch=2)).float().mean().backward()


def test_stereo_pruning_keeps_cost_volume_channels_aligned() -> None:
    # Zero one output channel of the shared feature projection: it then contributes an
    # all-zero channel to both halves of the cost volume, so pruning exactly that channel
    # (and the matching Conv3d input channels) must leave the output unchanged.
    torch.manual_seed(0)
    model = StereoNetLite(max_disp=16, width=4).eval()
    proj = model.feature[-1]
    first3d = model.aggregate[0][0]
    feat = proj.out_channels
    with torch.no_grad():
        proj.weight[1].zero_()
    left, right = example_inputs("stereo_lite", batch=2, size=(32, 64))
    with torch.no_grad():
        ref = model(left, right)
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=(left, right), forward_fn=lambda m, inp: m(*inp)
    )
    group = dg.get_pruning_group(proj, tp.prune_conv_out_channels, idxs=[1])
    group.prune()
    assert proj.out_channels == feat - 1
    assert first3d.in_channels == 2 * feat - 2
    with torch.no_grad():
        out = model(left, right)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _train_steps(model: torch.nn.Module, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


def test_segmentation_training_lowers_loss() -> None:
    torch.manual_seed(0)
    images, labels = make_segmentation_dataset(8, size=(32, 32), seed=0).tensors
    model = build_model("fcn_lite", width=8)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(images), labels)

    first, last = _train_steps(model, loss_fn, steps=40, lr=0.05)
    assert last < 0.7 * first


def test_deeplab_training_lowers_loss() -> None:
    torch.manual_seed(0)
    images, labels = make_segmentation_dataset(8, size=(32, 32), seed=1).tensors
    model = build_model("deeplabv3_lite", width=8)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(images), labels)

    first, last = _train_steps(model, loss_fn, steps=40, lr=0.05)
    assert last < 0.7 * first


def test_digits_training_lowers_loss() -> None:
    torch.manual_seed(0)
    train, _ = make_digits_splits(size=16, channels=1, seed=0)
    images, labels = train.tensors[0][:32], train.tensors[1][:32]
    model = build_model("resnet20", in_chans=1, width=8)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(images), labels)

    first, last = _train_steps(model, loss_fn, steps=30, lr=0.05)
    assert last < 0.5 * first


def test_stereo_training_lowers_loss() -> None:
    torch.manual_seed(0)
    left, right, disp = make_stereo_dataset(4, size=(32, 64), seed=0).tensors
    model = build_model("stereo_lite", width=4)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return F.smooth_l1_loss(m(left, right), disp)

    first, last = _train_steps(model, loss_fn, steps=30, lr=0.05)
    assert last < 0.8 * first
