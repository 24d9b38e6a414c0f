"""Data-driven criteria: the shared collection mechanism, Group Fisher and CDC."""

from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from conftest import ResBlockNet, Tiny3D, TinySeg

import kcp_plugin
from kcp_plugin.importance.cdc import CDCImportance
from kcp_plugin.importance.fisher import FisherImportance


def _cls_data(n_batches=3, batch=8, classes=5, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=gen),
             torch.randint(0, classes, (batch,), generator=gen)) for _ in range(n_batches)]


class MaskedRes(nn.Module):
    """ResBlockNet's structure with one explicit mask per coupled channel at every consumer input.

    ``dL/dm`` of this model is Group Fisher's per-sample mask gradient by definition.
    """

    def __init__(self, net: ResBlockNet):
        super().__init__()
        self.net = net
        self.m = nn.Parameter(torch.ones(16))

    def forward(self, x):
        n, m = self.net, self.m[None, :, None, None]
        s = n.stem(x)
        r1 = F.relu(s + n.b1(s * m))
        b2 = n.b2[3:](n.b2[:3](r1 * m))
        r2 = F.relu(r1 + b2)
        return n.fc(n.pool(r2).flatten(1) * self.m)


def test_fisher_equals_direct_mask_gradient_on_residual_group():
    torch.manual_seed(0)
    net = ResBlockNet().eval()
    data = _cls_data(2, 4)
    imp = FisherImportance(normalize="none")
    kcp_plugin.collect(net, data, imp)
    # direct: per-sample gradient of the shared mask, summed over the group, squared, summed
    masked = MaskedRes(copy.deepcopy(net)).eval()
    expected = torch.zeros(16, dtype=torch.float64)
    for x, y in data:
        for i in range(len(x)):
            masked.zero_grad()
            F.cross_entropy(masked(x[i:i + 1]), y[i:i + 1]).backward()
            expected += masked.m.grad.double().pow(2)
    # the residual group's root is the stem conv; score it through the pruner's groups
    graph = kcp_plugin.graph.build_graph(net, data[0][0][:1])
    group = graph.get_pruning_group(net.stem[0], graph.get_pruner_of_module(net.stem[0])
                                    .prune_out_channels, list(range(16)))
    imp.bind(net)
    got = imp(group).double()
    assert torch.allclose(got, expected.float().double(), rtol=1e-4, atol=1e-9)
    assert imp.samples == 2


def test_fisher_dead_channel_scores_zero_and_memory_normalisation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight[2] = 0
        net[0].bias[2] = -1  # channel 2 is always 0 after the ReLU
    data = _cls_data(2, 4, classes=3)
    raw = kcp_plugin.collect(net, data, FisherImportance(normalize="none"))
    mem = kcp_plugin.collect(net, data, FisherImportance(normalize="memory"))
    graph = kcp_plugin.graph.build_graph(net, data[0][0][:1])
    g1 = graph.get_pruning_group(net[0], graph.get_pruner_of_module(net[0]).prune_out_channels,
                                 list(range(4)))
    g2 = graph.get_pruning_group(net[2], graph.get_pruner_of_module(net[2]).prune_out_channels,
                                 list(range(6)))
    s_raw, s_mem = raw(g1), mem(g1)
    assert s_raw[2] == 0 and (s_raw[[0, 1, 3]] > 0).all()
    # memory cost of a channel of conv 0 = its 16x16 output map; of conv 2 = 7x7
    assert torch.allclose(s_mem, s_raw / 256, rtol=1e-5)
    assert torch.allclose(mem(g2), raw(g2) / 49, rtol=1e-5)


def test_flops_normalisation_counts_producer_and_consumer_macs():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data = [(torch.randn(2, 3, 8, 8), None)]

    def step(model, batch):
        return model(batch[0]).pow(2).sum()

    raw = kcp_plugin.collect(net, data, FisherImportance(normalize="none"), step_fn=step)
    fl = kcp_plugin.collect(net, data, FisherImportance(normalize="flops"), step_fn=step)
    graph = kcp_plugin.graph.build_graph(net, data[0][0][:1])
    g = graph.get_pruning_group(net[0], graph.get_pruner_of_module(net[0]).prune_out_channels,
                                list(range(4)))
    cost = 3 * 9 * 64 + 5 * 1 * 64  # filter of conv0 + kernels of conv2 reading the channel
    assert torch.allclose(fl(g), raw(g) / cost, rtol=1e-5)


def test_cdc_formulas_match_direct_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data = _cls_data(3, 10, classes=3, size=6)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in data:
            feats.append(net[1](net[0](x)).mean((2, 3)).double())
            labels.append(y)
    f, lab = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    for test in ("symdiv", "ttest"):
        imp = kcp_plugin.collect(net, data, CDCImportance(test=test))
        graph = kcp_plugin.graph.build_graph(net, data[0][0][:1])
        g = graph.get_pruning_group(net[0], graph.get_pruner_of_module(net[0])
                                    .prune_out_channels, list(range(4)))
        got = imp(g).double().numpy()
        want = []
        for c in range(4):
            per_class = []
            for k in range(3):
                pos, neg = f[lab == k, c], f[lab != k, c]
                mp_, mn, vp, vn = pos.mean(), neg.mean(), pos.var(), neg.var()
                if test == "ttest":
                    per_class.append(abs(mp_ - mn) / np.sqrt(vp / len(pos) + vn / len(neg) + 1e-4))
                else:
                    r = 0.05
                    per_class.append(0.5 * (vp / (vn + r) + vn / (vp + r))
                                     + 0.5 * (mp_ - mn) ** 2 / (vp + vn + r) - 1)
            want.append(np.mean(per_class))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_cdc_prefers_the_class_discriminative_channel_per_pixel():
    # channel 0 copies the label map (through input channel 0), channel 1 is pure noise
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2)[:, :, None, None])
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(2, 3, 1))
    data = []
    for _ in range(2):
        y = torch.randint(0, 3, (4, 8, 8))
        x = torch.stack([y.float() + 0.1 * torch.randn(4, 8, 8), torch.rand(4, 8, 8) * 3], 1)
        y[:, 0, 0] = 255  # ignored pixels
        data.append((x, y))
    imp = kcp_plugin.collect(net, data, CDCImportance())
    graph = kcp_plugin.graph.build_graph(net, data[0][0][:1])
    g = graph.get_pruning_group(conv, graph.get_pruner_of_module(conv).prune_out_channels, [0, 1])
    s = imp(g)
    assert s[0] > 10 * s[1]
    assert imp._stat(net[2], "n").sum() == 2 * 4 * 64 - 2 * 4  # ignore_index dropped


def test_prune_with_data_driven_criteria_one_shot_and_iterative():
    torch.manual_seed(0)
    data = _cls_data(2, 6)
    x = data[0][0][:1]
    for name in ("fisher", "cdc"):
        net = ResBlockNet()
        report = kcp_plugin.prune(net, x, name, target_macs_ratio=0.5, data=data, data_steps=1)
        assert abs(report.macs_ratio - 0.5) <= 0.02
        assert net(x).shape == (1, 5)
        net = ResBlockNet()
        report = kcp_plugin.prune(net, x, name, pruning_ratio=0.5, iterative_steps=2, data=data)
        assert net(x).shape == (1, 5) and report.macs_ratio < 0.6
    seg = TinySeg(4, 8)
    segdata = [(torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32)))]
    report = kcp_plugin.prune(seg, segdata[0][0][:1], "fisher", pruning_ratio=0.5, data=segdata)
    assert seg(segdata[0][0]).shape == (2, 4, 32, 32)


def test_fisher_on_a_3d_cost_volume_regression_with_custom_step():
    """Stereo-style: 3-D convs, a regression loss through step_fn, inputs as (inputs, target)."""
    torch.manual_seed(0)
    net = Tiny3D()
    data = [(torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 8, 8)) for _ in range(2)]

    def step(model, batch):
        return F.smooth_l1_loss(model(batch[0]), batch[1], reduction="sum")

    report = kcp_plugin.prune(net, data[0][0][:1], "fisher", pruning_ratio=0.5, data=data,
                              step_fn=step)
    assert net.c1[0].out_channels == 4 and report.macs_ratio < 0.6
    assert net(data[0][0]).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="class labels"):
        kcp_plugin.collect(net, data, CDCImportance())


def test_fisher_ranks_channels_the_loss_depends_on():
    # channel 1 of the first conv is ignored by the head: no gradient, pruned first
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[2].weight[:, 1] = 0
    data = _cls_data(2, 8, classes=3)
    before = copy.deepcopy(net.state_dict())
    kcp_plugin.prune(net, data[0][0][:1], "fisher", pruning_ratio=0.25, data=data,
                     ignored_layers=[net[2], net[5]])
    kept = net[0].weight
    assert kept.shape[0] == 3
    expected = before["0.weight"][[0, 2, 3]]
    assert torch.equal(kept, expected)


def test_data_driven_errors_leave_model_untouched():
    net = ResBlockNet()
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="data=<batches>"):
        kcp_plugin.prune(net, x, "fisher", pruning_ratio=0.5)
    with pytest.raises(ValueError, match="one-shot iterator"):
        kcp_plugin.prune(net, x, "cdc", pruning_ratio=0.5, iterative_steps=2,
                         data=iter(_cls_data(1)))
    with pytest.raises(ValueError, match="do(es)? not use them"):
        kcp_plugin.prune(net, x, "l2", pruning_ratio=0.5, data=_cls_data(1))
    with pytest.raises(ValueError, match="float|class labels|class targets"):
        kcp_plugin.collect(net, [(x, torch.randn(1, 5))], CDCImportance())
    with pytest.raises(ValueError, match="step_fn"):
        kcp_plugin.collect(nn.Sequential(nn.Conv2d(3, 2, 1)), [(x, torch.tensor([1]))],
                           FisherImportance(), example_inputs=x)
    with pytest.raises(RuntimeError, match="none was collected"):
        graph = kcp_plugin.graph.build_graph(net, x)
        group = graph.get_pruning_group(net.fc, graph.get_pruner_of_module(net.fc)
                                        .prune_in_channels, [0])
        FisherImportance()(group)
    with pytest.raises(ValueError, match="normalize must be one of"):
        kcp_plugin.get_importance("fisher", normalize="mac")
    for key, value in state.items():
        assert torch.equal(net.state_dict()[key], value)
    assert kcp_plugin.importance_info("fisher").requires_data
    assert kcp_plugin.importance_info("cdc").requires_data


def test_batches_are_counted_per_batch_whatever_the_step_calls():
    """collect() marks batches itself: Fisher's statistics are the same whether the step calls
    model(...), goes through another method (mmseg's model.loss) or also runs a gradient-free
    forward; a step that never runs the layers is an error that says so."""

    class WithLoss(ResBlockNet):
        def loss(self, x, y):
            return F.cross_entropy(self.forward(x), y, reduction="sum")

    torch.manual_seed(0)
    model = WithLoss()
    batches = _cls_data(3, 4)
    ref = kcp_plugin.collect(model, batches, FisherImportance(normalize="none"))
    via_loss = kcp_plugin.collect(model, batches, FisherImportance(normalize="none"),
                                  step_fn=lambda m, b: m.loss(*b))

    def twice(m, b):  # a second, gradient-free call (e.g. an EMA check) in the same batch
        with torch.no_grad():
            m(b[0])
        return F.cross_entropy(m(b[0]), b[1], reduction="sum")

    doubled = kcp_plugin.collect(model, batches, FisherImportance(normalize="none"),
                                 step_fn=twice)
    assert ref.samples == via_loss.samples == doubled.samples == 3
    for got in (via_loss, doubled):
        for a, b in zip(ref.state_tensors(), got.state_tensors(), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="hooked layers never ran"):
        kcp_plugin.collect(model, batches, FisherImportance(),
                           step_fn=lambda m, b: torch.zeros((), requires_grad=True).sum())


def test_collecting_context_manager_with_own_training_loop():
    torch.manual_seed(0)
    net = ResBlockNet()
    data = _cls_data(2, 4)
    ref = kcp_plugin.collect(copy.deepcopy(net), data, FisherImportance(normalize="none"))
    imp = FisherImportance(normalize="none")
    with kcp_plugin.collecting(net, imp, data[0][0][:1]):
        net.eval()
        for x, y in data:
            F.cross_entropy(net(x), y, reduction="sum").backward()
    assert imp.samples == 2
    for a, b in zip(ref.state_tensors(), imp.state_tensors()):
        assert torch.allclose(a, b)
    assert not net.stem[0]._forward_pre_hooks  # hooks removed


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = ResBlockNet()
        data = _cls_data(4, 4)[rank::world]  # each rank sees half of the batches
        imp = kcp_plugin.collect(net, data, FisherImportance(normalize="none"),
                                 example_inputs=data[0][0][:1])
        cdc = kcp_plugin.collect(net, data, CDCImportance(num_classes=5))
        torch.save({"fisher": imp.state_tensors(), "cdc": cdc.state_tensors(),
                    "samples": imp.samples}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_statistics_are_all_reduced(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stats")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    r0 = torch.load(f"{out}.0")
    r1 = torch.load(f"{out}.1")
    torch.manual_seed(0)
    net = ResBlockNet()
    data = _cls_data(4, 4)
    full = kcp_plugin.collect(net, data, FisherImportance(normalize="none"))
    full_cdc = kcp_plugin.collect(net, data, CDCImportance(num_classes=5))
    assert r0["samples"] == r1["samples"] == 4
    for key, ref in (("fisher", full), ("cdc", full_cdc)):
        for a, b, c in zip(r0[key], r1[key], ref.state_tensors()):
            assert torch.equal(a, b)  # every rank decides the same
            assert torch.allclose(a, c, rtol=1e-6)


def test_recent_batches_keeps_the_last_ones_and_is_reiterable():
    recent = kcp_plugin.RecentBatches(2, transform=lambda b: b * 10, owner="my loop")
    with pytest.raises(ValueError, match="my loop: a data-driven criterion needs training"):
        list(recent)
    for i in range(3):
        recent.add(i)
    assert len(recent) == 2 and list(recent) == [10, 20] and list(recent) == [10, 20]
    recent.clear()
    assert len(recent) == 0
    with pytest.raises(ValueError, match="maxlen"):
        kcp_plugin.RecentBatches(0)


def test_default_step_says_which_of_its_conditions_failed():
    from kcp_plugin.stats import default_step

    net, x = ResBlockNet().eval(), torch.randn(2, 3, 16, 16)
    cases = [
        ((x, torch.rand(2)), r"got floating-point targets of shape \(2,\) \(torch.float32\): "
                             r"class indices \(integers\) are needed"),
        (x, r"got a batch without targets \(a tensor of shape \(2, 3, 16, 16\)\): pass batches "
            r"of \(inputs, class targets\)"),
        ((x,), r"without targets \(a tuple of 1 item\(s\)\)"),
        ((x, [1, 2]), r"targets that are a list of 2 item\(s\), not a tensor of class indices"),
        ((x, torch.tensor([1, 0])[:, None, None]),  # cross-entropy's own shape error
         r"cross-entropy failed on an output of shape \(2, 5\) and targets of shape \(2, 1, 1\)"),
    ]
    for batch, says in cases:
        with pytest.raises(ValueError, match=says):
            default_step(net, batch)

    class DictOut(nn.Module):  # torchvision's segmentation models: {"out": ..., "aux": ...}
        def __init__(self):
            super().__init__()
            self.seg = TinySeg()

        def forward(self, x):
            return {"out": self.seg(x), "aux": self.seg(x)}

    y = torch.randint(0, 4, (2, 16, 16))
    with pytest.raises(ValueError, match=r"returned a dict with keys \['out', 'aux'\]") as info:
        default_step(DictOut(), (x, y))
    example = ('step_fn=lambda model, batch: F.cross_entropy(model(batch[0])["out"], batch[1], '
               'reduction="sum")')
    assert example in str(info.value)
    step = eval(example.removeprefix("step_fn="))  # the example given works
    imp = kcp_plugin.collect(DictOut(), [(x, y)], FisherImportance(), step_fn=step)
    assert imp.collected
    assert default_step(net, (x, torch.tensor([1, 0]))).dim() == 0  # the valid case


def test_cdc_without_labels_says_what_prune_accepts():
    """prune() has no labels_fn: the message says what works there (batches of (inputs,
    labels)) and names labels_fn only as an argument of kcp_plugin.collect()."""
    net, x = ResBlockNet().eval(), torch.randn(2, 3, 16, 16)
    with pytest.raises(kcp_plugin.errors.CriterionError) as info:
        kcp_plugin.prune(net, x, "cdc", pruning_ratio=0.5, data=[x], progress=False)
    text = str(info.value)
    assert "got a batch without them (a tensor of shape (2, 3, 16, 16))" in text
    assert "pass batches of (inputs, labels) as data" in text
    assert "or pass labels_fn" not in text
    assert "kcp_plugin.collect(model, batches, importance, labels_fn=lambda batch: " in text
    # what the message says works: collect with labels_fn, then prune with that importance
    imp = kcp_plugin.collect(net, [{"x": x, "y": torch.tensor([0, 1])}], CDCImportance(),
                             step_fn=lambda m, b: m(b["x"]), labels_fn=lambda b: b["y"])
    kcp_plugin.prune(net, x, imp, pruning_ratio=0.5, progress=False)
    assert net.stem[0].out_channels == 8


def test_cdc_squeezes_a_singleton_label_channel_and_names_unusable_label_shapes():
    """(N, 1, H, W) labels (mmseg's stacked gt_sem_seg) and (N, 1) class labels are the same
    labels as (N, H, W) and (N,); labels no layer can take are an error naming their shape,
    not "the hooked layers never ran"."""
    torch.manual_seed(0)
    seg, x = TinySeg().eval(), torch.randn(2, 3, 16, 16)
    y = torch.randint(0, 4, (2, 16, 16))
    ref = kcp_plugin.collect(seg, [(x, y)], CDCImportance())
    got = kcp_plugin.collect(seg, [(x, y[:, None])], CDCImportance())
    assert ref.samples == got.samples == 1
    for a, b in zip(ref.state_tensors(), got.state_tensors(), strict=True):
        torch.testing.assert_close(a, b)
    net, y1 = ResBlockNet().eval(), torch.tensor([0, 3])
    ref = kcp_plugin.collect(net, [(x, y1)], CDCImportance())
    got = kcp_plugin.collect(net, [(x, y1[:, None])], CDCImportance())
    for a, b in zip(ref.state_tensors(), got.state_tensors(), strict=True):
        torch.testing.assert_close(a, b)
    kcp_plugin.prune(seg, x, "cdc", pruning_ratio=0.5, data=[(x, y[:, None])], progress=False)
    assert seg.enc[0].out_channels == 8

    with pytest.raises(ValueError, match=r"cdc's labels of shape \(2, 3\) fit none of the "
                       r"hooked layers .*labels are \(N,\) class indices per sample"):
        kcp_plugin.collect(net, [(x, torch.randint(0, 5, (2, 3)))], CDCImportance())
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) for a batch of 2"):
        kcp_plugin.collect(net, [(x, torch.tensor([0, 1, 2]))], CDCImportance())
    with pytest.raises(ValueError, match="got a scalar"):
        kcp_plugin.collect(net, [(x, torch.tensor(1))], CDCImportance())
    imp = CDCImportance()  # in a loop of one's own, scoring says why nothing was collected
    with kcp_plugin.collecting(net, imp, x):
        imp.set_labels(torch.randint(0, 5, (2, 3)))
        net(x)
    graph = kcp_plugin.graph.build_graph(net, x)
    group = graph.get_pruning_group(net.fc, graph.get_pruner_of_module(net.fc)
                                    .prune_in_channels, [0])
    with pytest.raises(RuntimeError, match=r"none was collected \(cdc's labels of shape \(2, 3\)"):
        imp(group)
