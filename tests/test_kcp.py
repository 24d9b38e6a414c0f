"""KCP importance: known answers on hand-built layers, group reduction, torch-pruning pruners."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import ResBlockNet, Tiny3D, TinySeg

from kcp_plugin import KCPImportance, get_importance
from kcp_plugin.importance.kcp import kmeans
from kcp_plugin.views import consumer_rows, producer_rows

VARIANTS = [dict(centre="representative"), dict(centre="mean"), dict(centre="kmeans"),
            dict(centre="mean", prune="far"), dict(centre="representative", sides="both")]


def _conv_with_duplicate(c=8, n=6, dup=(2, 5), seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, n, 3)
    with torch.no_grad():
        conv.weight[:, dup[1]] = conv.weight[:, dup[0]]
    return conv


@pytest.mark.parametrize("keep_ratio", [0.5, 0.75, 7 / 8])
def test_duplicated_kernel_cluster_is_pruned_first_and_only_once(keep_ratio):
    conv = _conv_with_duplicate()
    scores = KCPImportance("representative", keep_ratio=keep_ratio).layer_scores(
        consumer_rows(conv))
    assert scores.argmin().item() in (2, 5)
    low, high = sorted([scores[2].item(), scores[5].item()])
    assert low == 0.0  # the copy is fully represented by its twin
    assert high > 0.0  # the twin itself is the representative, kept
    # the representative ranks above every non-representative channel
    assert high >= torch.sort(scores).values[round(8 * (1 - keep_ratio)) - 1].item()


def test_near_duplicates_rank_below_distinct_clusters():
    torch.manual_seed(3)
    conv = nn.Conv2d(10, 8, 3)
    with torch.no_grad():
        conv.weight[:, 7] = conv.weight[:, 1] + 1e-3 * torch.randn_like(conv.weight[:, 1])
    scores = KCPImportance("representative", keep_ratio=0.9).layer_scores(
        consumer_rows(conv))
    assert scores.argmin().item() in (1, 7)
    assert sorted(scores.tolist())[1] > 10 * scores.min().item()


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda v: str(v))
def test_scores_are_invariant_to_scaling_a_layer(variant):
    torch.manual_seed(0)
    rows = torch.randn(24, 45)
    imp = KCPImportance(keep_ratio=0.5, **variant)
    torch.testing.assert_close(imp.layer_scores(rows), imp.layer_scores(3.7 * rows))


def test_mean_variant_is_distance_to_layer_mean():
    torch.manual_seed(0)
    rows = torch.randn(12, 20)
    d = (rows - rows.mean(0)).norm(dim=1)
    torch.testing.assert_close(KCPImportance(centre="mean").layer_scores(rows), d / d.mean())
    far = KCPImportance(centre="mean", prune="far").layer_scores(rows)
    assert far.argmin() == d.argmax() and far.argmax() == d.argmin()


def test_kmeans_finds_obvious_clusters_deterministically():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(20, 2) for c in centres])
    labels, cents = kmeans(x, 3)
    for block in labels.view(3, 20):
        assert (block == block[0]).all()
    assert len(set(labels.tolist())) == 3
    labels2, _ = kmeans(x.clone(), 3)
    assert torch.equal(labels, labels2)


def test_grouped_conv_kernel_cluster_layout():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    rows = consumer_rows(conv)
    w = conv.weight.detach()
    assert rows.shape == (4, 3 * 9)
    for c in range(4):
        g, local = divmod(c, 2)
        torch.testing.assert_close(rows[c], w[3 * g:3 * g + 3, local].flatten())
    tconv = nn.ConvTranspose2d(4, 6, 2, groups=2)
    prow = producer_rows(tconv)
    assert prow.shape == (6, 2 * 4)
    for n in range(6):
        g, local = divmod(n, 3)
        torch.testing.assert_close(prow[n], tconv.weight.detach()[2 * g:2 * g + 2, local].flatten())


def test_group_score_is_mean_of_normalised_consumer_scores():
    model = ResBlockNet().eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model.stem[0], tp.prune_conv_out_channels, list(range(16)))
    imp = KCPImportance(centre="mean")
    consumers = [model.b1[0], model.b2[0], model.fc]
    expected = torch.stack([imp.layer_scores(consumer_rows(m)) for m in consumers]).mean(0)
    torch.testing.assert_close(imp(group), expected)


def test_channel_duplicated_in_every_consumer_is_pruned_first():
    model = ResBlockNet().eval()
    with torch.no_grad():
        for m in (model.b1[0], model.b2[0]):
            m.weight[:, 7] = m.weight[:, 3]
        model.fc.weight[:, 7] = model.fc.weight[:, 3]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model.stem[0], tp.prune_conv_out_channels, list(range(16)))
    scores = KCPImportance("representative", keep_ratio=0.75)(group)
    assert scores.argmin().item() in (3, 7)
    assert min(scores[3], scores[7]) < 1e-6 < max(scores[3], scores[7])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: str(v))
def test_scores_are_deterministic(variant):
    model = ResBlockNet().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 8, 8)
    out = []
    for m in (model, twin):
        graph = tp.DependencyGraph().build_dependency(m, example_inputs=x)
        groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
        out.append([KCPImportance(**variant)(g) for g in groups])
    for a, b in zip(*out):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(global_pruning=True), dict(iterative_steps=3), dict(round_to=4),
     dict(global_pruning=True, isomorphic=True), dict(pruning_ratio_dict="b2")],
    ids=["local", "global", "iterative", "round_to", "isomorphic", "ratio_dict"],
)
def test_works_inside_torch_pruning_pruners(kwargs):
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    kwargs = dict(kwargs)
    if kwargs.get("pruning_ratio_dict") == "b2":
        kwargs["pruning_ratio_dict"] = {model.b2[0]: 0.75}
    steps = kwargs.pop("iterative_steps", 1)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=get_importance("kcp"), pruning_ratio=0.5, iterative_steps=steps,
        ignored_layers=[model.fc], num_heads={}, out_channel_groups={}, in_channel_groups={},
        **kwargs,
    )
    before = sum(p.numel() for p in model.parameters())
    for _ in range(steps):
        pruner.step()
    assert model(x).shape == (1, 5)
    assert sum(p.numel() for p in model.parameters()) < before
    if "round_to" in kwargs:
        assert model.stem[0].out_channels % 4 == 0 and model.b2[0].out_channels % 4 == 0
    if "pruning_ratio_dict" in kwargs:
        assert model.b2[0].out_channels == 8  # 32 * (1 - 0.75)


@pytest.mark.parametrize("builder,inputs,out_shape", [
    (TinySeg, (1, 3, 16, 16), (1, 4, 16, 16)),
    (Tiny3D, (1, 4, 6, 8, 8), (1, 6, 8, 8)),
], ids=["depthwise-grouped-transposed-groupnorm", "conv3d"])
def test_kcp_scores_every_group_of_depthwise_grouped_and_3d_nets(builder, inputs, out_shape):
    torch.manual_seed(0)
    model = builder().eval()
    x = torch.randn(*inputs)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    roots = [nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d]
    for group in graph.get_all_groups(root_module_types=roots):
        for centre in ("mean", "representative", "kmeans"):
            scores = KCPImportance(centre)(group)
            assert scores is not None and torch.isfinite(scores).all()
            assert len(scores) == len(group[0].idxs)


def test_bad_options_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="'representative', 'mean', 'kmeans'"):
        KCPImportance(centre="median")
    with pytest.raises(ValueError, match="prune='far'"):
        KCPImportance("representative", prune="far")
    with pytest.raises(ValueError, match="keep_ratio"):
        KCPImportance(keep_ratio=1.5)


def test_layer_score_cache_is_invalidated_by_weight_changes():
    model = ResBlockNet().eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model.b2[0], tp.prune_conv_out_channels, list(range(32)))
    imp = KCPImportance(centre="mean")
    first = imp(group)
    assert torch.equal(imp(group), first) and len(imp._cache) == 1  # served from the cache
    with torch.no_grad():
        model.b2[3].weight[:, 0] *= 10  # the consumer's kernel cluster of channel 0 changes
    changed = imp(group)
    assert changed[0] > first[0]
    torch.testing.assert_close(changed, KCPImportance(centre="mean")(group))
