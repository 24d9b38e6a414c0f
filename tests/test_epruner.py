"""EPruner: Affinity Propagation against scikit-learn, known clusterings, adaptive widths."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import ResBlockNet, Tiny3D, TinySeg
from sklearn.cluster import AffinityPropagation

import kcp_plugin
import kcp_plugin.importance.epruner as ep
from kcp_plugin.affinity import (
    affinity_propagation,
    median_preference,
    squared_distance_similarity,
)
from kcp_plugin.graph import build_graph
from kcp_plugin.importance.epruner import EPrunerImportance, cluster_rows
from kcp_plugin.recipes import epruner_prune, epruner_widths


def _sklearn_ap(S: torch.Tensor, pref: torch.Tensor, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its ConvergenceWarning on purpose-made failures
        return AffinityPropagation(affinity="precomputed", preference=pref.numpy(),
                                   random_state=0, **kw).fit(S.numpy())


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_iter", [200, 3])
def test_affinity_propagation_matches_sklearn_exactly(seed, max_iter):
    g = torch.Generator().manual_seed(seed)
    n = [6, 13, 40, 64][seed % 4]
    x = torch.randn(n, 7, generator=g, dtype=torch.float64)
    if seed % 2:  # near-duplicates, the hard case for tie-breaking
        x[n // 2:] = x[: n - n // 2] + 1e-3 * torch.randn(n - n // 2, 7, generator=g,
                                                         dtype=torch.float64)
    S = squared_distance_similarity(x)
    pref = median_preference(x, [0.45, 1.0, 3.0][seed % 3])
    sk = _sklearn_ap(S, pref, max_iter=max_iter)
    # scikit-learn's tie-breaking noise comes from RandomState(0): feed the same draws
    noise = torch.from_numpy(np.random.RandomState(0).standard_normal((n, n)))
    ours = affinity_propagation(S, pref, noise=noise, max_iter=max_iter)
    np.testing.assert_array_equal(ours.exemplars.numpy(), sk.cluster_centers_indices_)
    np.testing.assert_array_equal(ours.labels.numpy(), sk.labels_)
    assert ours.n_iter == sk.n_iter_
    assert ours.converged == (max_iter == 200)  # 3 iterations never pass the 15-iteration test


def test_similarity_and_preference_are_the_papers_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)
    S = squared_distance_similarity(x)
    direct = -torch.cdist(x, x).pow(2)
    torch.testing.assert_close(S, direct)
    assert (S.diagonal() == 0).all()
    # p_j = beta * median_i S(i, j), numpy's median (also with an even count)
    for rows in (x, x[:10]):
        Sn = squared_distance_similarity(rows).numpy()
        np.testing.assert_allclose(median_preference(rows, 0.7).numpy(),
                                   0.7 * np.median(Sn, axis=0))
    # computed in column blocks for wide layers: same numbers
    torch.testing.assert_close(median_preference(x, 2.0, block=3), median_preference(x, 2.0))


def _hierarchy(seed=0):
    """24 rows: 2 far-apart super-clusters, each of 3 sub-clusters of 4 near-copies."""
    g = torch.Generator().manual_seed(seed)
    sup = 10 * torch.randn(2, 20, generator=g)
    sub = sup.repeat_interleave(3, 0) + 3 * torch.randn(6, 20, generator=g)
    return sub.repeat_interleave(4, 0) + 0.1 * torch.randn(24, 20, generator=g)


def test_beta_controls_the_number_of_exemplars():
    x = _hierarchy()
    fine, coarse = cluster_rows(x, 0.45), cluster_rows(x, 4.0)
    assert fine.converged and coarse.converged
    # one exemplar per sub-cluster of 4 / per super-cluster of 12
    assert sorted((fine.exemplars // 4).tolist()) == list(range(6))
    assert sorted((coarse.exemplars // 12).tolist()) == [0, 1]
    # every row's exemplar sits in its own sub-cluster
    assert torch.equal(fine.rep // 4, torch.arange(24) // 4)


def test_scores_put_exemplars_first_in_both_orders():
    x = _hierarchy()
    for order in ("evidence", "distance"):
        imp = EPrunerImportance(beta=0.45, order=order)
        c = imp.cluster(x)
        scores = imp.scores(c)
        assert sorted(scores.topk(6).indices.tolist()) == c.exemplars.tolist()
        assert (scores[c.exemplars] > 1).all() and (scores.sort().values[:18] < 1).all()
    # "distance": the non-exemplar closest to its exemplar goes first
    imp = EPrunerImportance(beta=0.45, order="distance")
    c = imp.cluster(x)
    non = (c.rep != torch.arange(24)).nonzero().flatten()
    assert imp.scores(c).argmin() == non[c.sq_dist[non].argmin()]
    # "evidence": the non-exemplar with the least evidence goes first
    imp = EPrunerImportance(beta=0.45, order="evidence")
    assert imp.scores(c).argmin() == non[c.evidence[non].argmin()]


def test_chunked_clustering_bounds_each_run_and_finds_the_same_clusters(monkeypatch):
    g = torch.Generator().manual_seed(1)
    centres = 5 * torch.randn(12, 30, generator=g)
    x = centres.repeat_interleave(8, 0) + 0.2 * torch.randn(96, 30, generator=g)
    sizes = []
    real = ep.affinity_propagation

    def spy(S, pref, **kw):
        sizes.append(S.shape[0])
        return real(S, pref, **kw)

    monkeypatch.setattr(ep, "affinity_propagation", spy)
    exact = cluster_rows(x, 0.45, max_exact=128)
    assert sizes == [96]
    sizes.clear()
    chunked = cluster_rows(x, 0.45, max_exact=20)
    assert len(sizes) > 5 and max(sizes) <= 20
    for c in (exact, chunked):
        assert sorted((c.exemplars // 8).tolist()) == list(range(12))
        assert torch.equal(c.rep // 8, torch.arange(96) // 8)


class DupNet(nn.Module):
    """conv1: 3 distinct filters x 4 copies; conv2: 2 distinct filters x 4 copies."""

    def __init__(self, noise: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for conv, k in ((self.conv1, 3), (self.conv2, 2)):
                w = conv.weight
                patterns = w[:k].clone()
                for c in range(w.shape[0]):  # interleaved: channel c copies pattern c % k
                    w[c] = patterns[c % k] + noise * torch.randn_like(patterns[0])
                    conv.bias[c] = conv.bias[c % k]

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


@pytest.mark.parametrize("noise", [0.0, 1e-3])
@pytest.mark.parametrize("beta", [0.1, 0.45, 2.0])
def test_adaptive_mode_keeps_one_filter_per_cluster_of_copies(noise, beta):
    model, x = DupNet(noise).eval(), torch.randn(2, 3, 8, 8)
    widths = epruner_widths(model, x, beta)
    assert widths == {"conv1": pytest.approx(1 - 3.5 / 12), "conv2": pytest.approx(1 - 2.5 / 8)}
    out_before = model(x)
    report = epruner_prune(model, x, beta)
    assert model.conv1.out_channels == 3 and model.conv2.out_channels == 2
    assert report.widths_after["conv1"] == 3
    # one of each pattern survives, so (for exact copies) the network computes the same function
    # up to the duplicated channels' summed contributions: check the kept filters are distinct
    w = model.conv1.weight.flatten(1)
    assert torch.cdist(w, w).add(torch.eye(3)).min() > 0.1
    assert model(x).shape == out_before.shape


def test_ratio_driven_pruning_keeps_the_exemplars_first():
    model, x = DupNet(1e-3).eval(), torch.randn(2, 3, 8, 8)
    kcp_plugin.prune(model, x, EPrunerImportance(), pruning_ratio_dict={"conv1": 0.65})
    assert model.conv1.out_channels == 4  # int(12 * 0.35): the 3 exemplars + one copy
    w = model.conv1.weight.flatten(1)
    d = torch.cdist(w, w) + 10 * torch.eye(4)
    assert (d < 0.1).sum() == 2  # exactly one pair of copies among the 4 kept filters


def _group_of(model, x, layer):
    graph = build_graph(model, x)
    return graph.get_pruning_group(layer, tp.prune_conv_out_channels,
                                   list(range(layer.out_channels)))


def test_coupled_group_clusters_the_concatenated_producers():
    model, x = ResBlockNet(width=8).eval(), torch.randn(1, 3, 8, 8)
    producers = [model.stem[0], model.b1[3], model.b2[3]]
    with torch.no_grad():  # channel c copies pattern c % 2 in the stem only
        w = model.stem[0].weight
        w.copy_(w[:2].repeat(4, 1, 1, 1))
    imp = EPrunerImportance(beta=0.45)
    group = _group_of(model, x, model.stem[0])
    rows = imp.group_rows(group)

    def block(conv):
        r = conv.weight.detach().flatten(1).double()
        return r / r.pow(2).sum(1).mean().sqrt()

    # the group lists its producers in graph order: compare order-free quantities
    assert rows.shape == (8, sum(c.weight[0].numel() for c in producers))
    expected = sum(torch.cdist(block(c), block(c)).pow(2) for c in producers)
    torch.testing.assert_close(torch.cdist(rows, rows).pow(2), expected)
    # the block outputs' filters differ per channel, so the stem's copies are not merged
    assert len(imp.cluster_group(group).exemplars) > 2
    # once every producer repeats the same pattern, the whole group collapses to 2 channels
    with torch.no_grad():
        for conv in producers[1:]:
            conv.weight.copy_(conv.weight[:2].repeat(4, 1, 1, 1))
    group = _group_of(model, x, model.stem[0])
    assert len(imp.cluster_group(group).exemplars) == 2
    epruner_prune(model, x, 0.45)
    assert all(c.out_channels == 2 for c in producers)
    assert model(x).shape == (1, 5)


def test_non_convergence_warns_names_the_layer_and_falls_back():
    model, x = DupNet(0.05).eval(), torch.randn(2, 3, 8, 8)
    norms = model.conv1.weight.detach().flatten(1).norm(dim=1)
    group = _group_of(model, x, model.conv1)
    # 5 iterations cannot pass the 15-iteration convergence test; the exemplars of the last
    # iteration (already the 3 patterns here) are used
    kw = dict(max_iter=5, retry_damping=None)
    with pytest.warns(RuntimeWarning, match=r"conv1 \(12 channels\) did not converge"):
        widths = epruner_widths(model, x, 0.45, importance_kwargs=kw)
    assert widths["conv1"] == pytest.approx(1 - 3.5 / 12)
    # fallback="l2": rank by the filters' L2 norm, keep the width in adaptive mode
    imp = EPrunerImportance(fallback="l2", **kw)
    with pytest.warns(RuntimeWarning, match="ranking by L2 norm"):
        scores = imp(group)
    assert torch.equal(scores.argsort(), norms.argsort())
    with pytest.warns(RuntimeWarning, match="conv1"):
        widths = epruner_widths(model, x, 0.45, importance_kwargs={**kw, "fallback": "l2"})
    assert widths["conv1"] == 0.0
    # no exemplar at all after 2 iterations: L2 ranking, no crash
    kw = dict(max_iter=2, retry_damping=None)
    with pytest.warns(RuntimeWarning, match=r"conv1 \(12 channels\) found no exemplar"):
        scores = EPrunerImportance(**kw)(group)
    assert torch.equal(scores.argsort(), norms.argsort())
    # and prune() goes through with the fallbacks
    with pytest.warns(RuntimeWarning):
        kcp_plugin.prune(model, x, "epruner", pruning_ratio=0.5, importance_kwargs=kw)
    assert model.conv1.out_channels == 6


def test_retry_with_stronger_damping_rescues_an_oscillating_run():
    # big clusters of noisy copies in a high dimension make damping-0.5 messages oscillate
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 4608, generator=g)
    x = centres.repeat_interleave(16, 0) + 0.3 * torch.randn(64, 4608, generator=g)
    plain = cluster_rows(x, 0.45, retry_damping=None)
    retried = cluster_rows(x, 0.45, retry_damping=0.9)
    assert not plain.converged and len(plain.exemplars) > 4
    assert retried.converged
    assert sorted((retried.exemplars // 16).tolist()) == list(range(4))


@pytest.mark.parametrize("make, shape", [
    (lambda: ResBlockNet(), (2, 3, 16, 16)),
    (lambda: TinySeg(w=64), (1, 3, 16, 16)),
    (lambda: Tiny3D(w=32), (1, 4, 6, 8, 8)),
])
def test_prune_to_a_macs_target_with_epruner(make, shape):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    out = model(x)
    report = kcp_plugin.prune(model, x, "epruner", target_macs_ratio=0.5)
    assert report.importance == "epruner"
    assert abs(report.macs_after / report.macs_before - 0.5) <= 0.02
    assert model(x).shape == out.shape


def test_scores_are_identical_on_a_deep_copy_and_the_cache_keys_on_content():
    model, x = ResBlockNet().eval(), torch.randn(1, 3, 8, 8)
    clone = copy.deepcopy(model)
    imp = EPrunerImportance(beta=1.0)
    a = imp(_group_of(model, x, model.b1[0]))
    b = imp(_group_of(clone, x, clone.b1[0]))
    torch.testing.assert_close(a, b)
    with torch.no_grad():
        clone.b1[0].weight[:8].mul_(3)  # same storage, new content: new clustering
    c = imp(_group_of(clone, x, clone.b1[0]))
    assert not torch.equal(a, c)


def test_registered_and_bad_arguments_are_refused():
    imp = kcp_plugin.get_importance("epruner", beta=1.5, order="distance")
    assert isinstance(imp, EPrunerImportance) and imp.beta == 1.5
    for kw, msg in [({"beta": -1}, "beta"), ({"order": "size"}, "order must be one of"),
                    ({"fallback": "zero"}, "fallback"), ({"damping": 0.2}, "damping"),
                    ({"max_iter": 0}, "max_iter"), ({"max_exact": 1}, "max_exact"),
                    ({"member_scale": "max"}, "member_scale")]:
        with pytest.raises(ValueError, match=msg):
            EPrunerImportance(**kw)
    model, x = DupNet().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="does not accept target_macs_ratio"):
        epruner_prune(model, x, 0.45, target_macs_ratio=0.5)
    assert model.conv1.out_channels == 12
