"""Blended criteria: rank formula, per-layer clustering, weights, evolutionary weight search."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import ResBlockNet, TinySeg

import kcp_plugin
from kcp_plugin.graph import build_graph
from kcp_plugin.importance.blend import BlendImportance, average_ranks, cluster_criteria
from kcp_plugin.recipes import search_blend_weights


class TwoConv(nn.Module):
    """conv1's filters are the given 2-D points; conv2 reads every channel with equal kernels,
    so only conv1's filters tell the channels apart."""

    def __init__(self, points):
        super().__init__()
        self.conv1 = nn.Conv2d(2, len(points), 1, bias=False)
        self.conv2 = nn.Conv2d(len(points), 3, 1, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor(points).view(len(points), 2, 1, 1))
            self.conv2.weight.fill_(1.0)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


# L2 prunes the small filter 0 first; FPGM the central filter 4 first
POINTS = [(0.3, 0.3), (3.0, 0.2), (0.2, 3.0), (3.0, 3.0), (1.6, 1.6)]


def _group(model, layer, x=None):
    x = torch.randn(1, 2, 4, 4) if x is None else x
    graph = build_graph(model, x)
    return graph.get_pruning_group(layer, tp.prune_conv_out_channels,
                                   list(range(layer.out_channels)))


def test_average_ranks_match_a_direct_count():
    x = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 2.0, 2.0])
    n = len(x)
    direct = torch.tensor([((x < v).sum() + ((x == v).sum() - 1) / 2).item() for v in x]) / (n - 1)
    torch.testing.assert_close(average_ranks(x), direct)
    assert average_ranks(torch.tensor([7.0])).tolist() == [1.0]
    assert average_ranks(torch.ones(4)).tolist() == [0.5] * 4


@pytest.mark.parametrize("name", ["l1", "l2", "fpgm", "kcp"])
def test_single_criterion_pool_is_that_criterion_s_ranking(name):
    torch.manual_seed(0)
    model, x = ResBlockNet().eval(), torch.randn(1, 3, 8, 8)
    graph = build_graph(model, x)
    member = kcp_plugin.get_importance(name)
    blend = BlendImportance(pool=(name,))
    groups = list(graph.get_all_groups(ignored_layers=[model.fc],
                                       root_module_types=[nn.Conv2d, nn.Linear]))
    assert len(groups) == 3
    for group in groups:
        torch.testing.assert_close(blend(group), average_ranks(member(group)))


def test_one_hot_weights_reproduce_a_criterion_even_inside_a_cluster():
    torch.manual_seed(0)
    model, x = ResBlockNet().eval(), torch.randn(1, 3, 8, 8)
    group = _group(model, model.b2[0], x)
    for name in ("l1", "l2", "fpgm", "kcp"):
        blend = BlendImportance(pool=("l1", "l2", "fpgm", "kcp"), weights={name: 1.0})
        torch.testing.assert_close(blend(group),
                                   average_ranks(kcp_plugin.get_importance(name)(group)))
        cluster = next(c for c in blend.last_clusters if name in c[0])
        assert cluster[1] == name  # the weighted member represents its cluster


def test_weights_move_the_ranking_between_criteria_on_a_constructed_layer():
    model = TwoConv(POINTS)
    group = _group(model, model.conv1)
    l2 = kcp_plugin.get_importance("l2")(group)
    fpgm = kcp_plugin.get_importance("fpgm")(group)
    assert l2.argmin() == 0 and fpgm.argmin() == 4  # the layer is built for this
    pool = ("l2", "fpgm")
    for weights, first in (((1, 0), 0), ((0.8, 0.2), 0), ((0.2, 0.8), 4), ((0, 1), 4)):
        scores = BlendImportance(pool, weights=weights, threshold=1.0)(group)
        assert scores.argmin() == first, weights
    # the blend formula, computed directly: alpha-weighted mean of the representatives' ranks
    blend = BlendImportance(pool, weights=(0.3, 0.7), threshold=1.0)
    expected = (0.3 * average_ranks(l2) + 0.7 * average_ranks(fpgm)) / 1.0
    torch.testing.assert_close(blend(group), expected)
    assert [c[0] for c in blend.last_clusters] == [["l2"], ["fpgm"]]
    # and through prune(): removing one channel removes the weighted criterion's choice
    for weights, gone in (((0.8, 0.2), 0), ((0.2, 0.8), 4)):
        m = TwoConv(POINTS)
        kcp_plugin.prune(m, torch.randn(1, 2, 4, 4),
                         BlendImportance(pool, weights=weights, threshold=1.0),
                         pruning_ratio_dict={"conv1": 0.2}, protect_outputs=True)
        kept = m.conv1.weight.flatten(1)
        assert m.conv1.out_channels == 4
        assert not any(torch.allclose(k, torch.tensor(POINTS[gone])) for k in kept)


def test_clustering_groups_criteria_that_agree():
    # filters that are scaled copies of one filter: L1 and L2 rank them identically
    base = torch.tensor([1.0, 2.0])
    points = [tuple((s * base).tolist()) for s in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)]
    model = TwoConv(points)
    blend = BlendImportance(pool=("l1", "fpgm", "l2"))
    blend(_group(model, model.conv1))
    clusters = [c[0] for c in blend.last_clusters]
    assert ["l1", "l2"] in clusters and ["fpgm"] in clusters
    # uniform weights: the two-member cluster counts once, as much as fpgm
    assert {c[2] for c in blend.last_clusters} == {1.0}
    # with uniform weights the medoid tie goes to pool order
    assert next(c for c in blend.last_clusters if c[0] == ["l1", "l2"])[1] == "l1"


def test_cluster_criteria_average_linkage_and_fixed_count():
    rho = torch.tensor([[1.0, 0.95, 0.2, 0.1],
                        [0.95, 1.0, 0.3, 0.2],
                        [0.2, 0.3, 1.0, 0.85],
                        [0.1, 0.2, 0.85, 1.0]])
    assert cluster_criteria(rho, threshold=0.9) == [[0, 1], [2], [3]]
    assert cluster_criteria(rho, threshold=0.8) == [[0, 1], [2, 3]]
    # average linkage: (0.2 + 0.1 + 0.3 + 0.2) / 4 = 0.2 between the two pairs
    assert cluster_criteria(rho, threshold=0.2) == [[0, 1, 2, 3]]
    assert cluster_criteria(rho, threshold=0.21) == [[0, 1], [2, 3]]
    assert cluster_criteria(rho, n_clusters=3) == [[0, 1], [2], [3]]
    assert cluster_criteria(rho, threshold=1.0, n_clusters=1) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("make, shape", [(lambda: ResBlockNet(), (2, 3, 16, 16)),
                                         (lambda: TinySeg(w=64), (1, 3, 16, 16))])
def test_prune_to_a_macs_target_with_blend(make, shape):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    out = model(x)
    report = kcp_plugin.prune(model, x, "blend", target_macs_ratio=0.5)
    assert abs(report.macs_after / report.macs_before - 0.5) <= 0.02
    assert model(x).shape == out.shape


def _distance_to_reference(reference):
    ref = [p.detach().clone() for p in reference.parameters()]

    @torch.no_grad()
    def evaluate(pruned):
        params = list(pruned.parameters())
        if [p.shape for p in params] != [r.shape for r in ref]:
            return -1e9
        return -float(sum((p - r).abs().sum() for p, r in zip(params, ref)))

    return evaluate


def test_search_finds_the_criterion_the_fitness_rewards():
    torch.manual_seed(0)
    model, x = ResBlockNet().eval(), torch.randn(1, 3, 8, 8)
    reference = copy.deepcopy(model)
    kcp_plugin.prune(reference, x, "fpgm", pruning_ratio=0.5)
    evaluate = _distance_to_reference(reference)
    pool = ("l1", "kcp", "fpgm")  # population 3: fpgm's vertex is not among the starts
    for other in ("l1", "kcp"):  # the other pure criteria really prune differently
        m = copy.deepcopy(model)
        kcp_plugin.prune(m, x, other, pruning_ratio=0.5)
        assert evaluate(m) < -1.0
    state = copy.deepcopy(model.state_dict())
    best, history = search_blend_weights(model, x, evaluate, pool, target_macs_ratio=None,
                                         pruning_ratio=0.5, population=3, generations=4,
                                         offspring=4, sigma=0.3, seed=0, progress=False)
    assert max(best, key=best.get) == "fpgm"
    assert max(h["fitness"] for h in history) == 0.0  # the same channels as fpgm alone
    assert history[0]["weights"] == pytest.approx({n: 1 / 3 for n in pool}, abs=1e-5)
    assert len(history) == 3 + 4 * 4
    assert abs(sum(best.values()) - 1) < 1e-4
    # the user's model is untouched, and the same seed gives the same search
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    short = dict(target_macs_ratio=None, pruning_ratio=0.5, population=2, generations=1,
                 offspring=2, sigma=0.3, progress=False)
    runs = [search_blend_weights(model, x, evaluate, pool, seed=s, **short) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert [h["weights"] for h in runs[0][1]] != [h["weights"] for h in runs[2][1]]


def test_search_interrupt_returns_best_so_far_or_reraises():
    torch.manual_seed(0)
    model, x = ResBlockNet().eval(), torch.randn(1, 3, 8, 8)
    calls = []

    def evaluate(pruned):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return float(len(calls))

    kw = dict(target_macs_ratio=None, pruning_ratio=0.5, population=4, generations=2,
              progress=False)
    with pytest.warns(RuntimeWarning, match="interrupted after 2 evaluations"):
        best, history = search_blend_weights(model, x, evaluate, ("l1", "fpgm"), **kw)
    assert len(history) == 2 and best == history[1]["weights"]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        search_blend_weights(model, x, evaluate, ("l1", "fpgm"), on_interrupt="raise", **kw)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"unknown importance 'l3'.*Valid names"):
        BlendImportance(pool=("l1", "l3"))
    with pytest.raises(ValueError, match=r"'taylor' needs gradients.*data-free choices: .*fpgm"):
        BlendImportance(pool=("l1", "taylor"))
    with pytest.raises(ValueError, match="'hessian' needs gradients"):
        BlendImportance(pool=("hessian",))
    with pytest.raises(ValueError, match="weight of 'l2' is negative"):
        BlendImportance(pool=("l1", "l2"), weights=(1.0, -0.5))
    with pytest.raises(ValueError, match="weights has 3 entries but the pool has 2"):
        BlendImportance(pool=("l1", "l2"), weights=(1, 1, 1))
    with pytest.raises(ValueError, match="not all be zero"):
        BlendImportance(pool=("l1", "l2"), weights=(0, 0))
    with pytest.raises(ValueError, match="'fpgm', which are not in the pool"):
        BlendImportance(pool=("l1", "l2"), weights={"fpgm": 1})
    with pytest.raises(ValueError, match="twice"):
        BlendImportance(pool=("l1", "L1"))
    with pytest.raises(ValueError, match="pool is empty"):
        BlendImportance(pool=())
    with pytest.raises(ValueError, match="cannot contain 'blend'"):
        BlendImportance(pool=("blend",))
    with pytest.raises(ValueError, match="threshold"):
        BlendImportance(threshold=1.5)
    with pytest.raises(ValueError, match="not in the pool"):
        BlendImportance(pool=("l1",), pool_kwargs={"kcp": {"centre": "mean"}})
    model, x = ResBlockNet().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match="evaluate_fn"):
        search_blend_weights(model, x, None)
    with pytest.raises(ValueError, match="exactly one of"):
        search_blend_weights(model, x, lambda m: 0.0, pruning_ratio=0.5)
    with pytest.raises(ValueError, match="population"):
        search_blend_weights(model, x, lambda m: 0.0, population=1)
    with pytest.raises(ValueError, match="'taylor' needs gradients"):
        search_blend_weights(model, x, lambda m: 0.0, pool=("taylor",))
    assert isinstance(kcp_plugin.get_importance("blend", pool=["l1", "fpgm"]), BlendImportance)
