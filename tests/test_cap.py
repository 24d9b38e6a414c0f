"""CaP (compensation-aware ranking) and least-squares compensation after any criterion."""

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
import torch_pruning as tp
from conftest import ResBlockNet, TinySeg

import kcp_plugin
from kcp_plugin.compensation import (
    collect_compensation_stats,
    compensate,
    compensating,
)
from kcp_plugin.consumers import layout_of, sample_features
from kcp_plugin.importance.cap import CaPImportance, greedy_selection
from kcp_plugin.models import build_model
from kcp_plugin.views import CONSUMER_FNS


def _smooth_images(n: int, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Spatially correlated random images (upsampled noise), like natural feature maps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size // 4, size // 4, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _redundant_producer(kind: str, out: int = 8) -> nn.Module:
    """A producer whose channel 3 is ``2 * ch1 - ch0`` (and 7 = 2 * ch5 - ch4), exactly."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, out, 3, padding=1) if kind == "conv" else nn.Linear(6, out)
    with torch.no_grad():
        for off in range(0, out, 4):
            layer.weight[off + 3] = 2 * layer.weight[off + 1] - layer.weight[off]
            layer.bias[off + 3] = 2 * layer.bias[off + 1] - layer.bias[off]
    return layer


CONSUMERS = {
    "conv3x3": lambda: nn.Conv2d(8, 5, 3, padding=1),
    "conv3x3_no_bias": lambda: nn.Conv2d(8, 5, 3, padding=1, bias=False),
    "conv_stride2_dil2": lambda: nn.Conv2d(8, 5, 3, stride=2, padding=2, dilation=2),
    "conv_reflect": lambda: nn.Conv2d(8, 5, 3, padding=1, padding_mode="reflect"),
    "grouped": lambda: nn.Conv2d(8, 6, 3, padding=1, groups=2),
    "transposed_k2s2": lambda: nn.ConvTranspose2d(8, 5, 2, stride=2),
    "transposed_k3s1": lambda: nn.ConvTranspose2d(8, 5, 3, padding=1),
    "linear": lambda: nn.Linear(8, 5),
}


# ---------------------------------------------------------------------- (1) exact compensation
@pytest.mark.parametrize("max_dim", [576, 4], ids=["patch", "channel_blocks"])
@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_compensation_is_exact_for_a_linear_combination_channel(consumer, max_dim):
    kind = "linear" if consumer == "linear" else "conv"
    model = nn.Sequential(_redundant_producer(kind), CONSUMERS[consumer]()).eval()
    shape = (4, 6) if kind == "linear" else (4, 3, 12, 12)
    data = [torch.randn(*shape) for _ in range(3)]
    test = torch.randn(*shape)
    dense_out = model(test).detach()
    stats = collect_compensation_stats(model, data, max_dim=max_dim, progress=False)
    assert (stats.layout("1").mode == "patch") == (max_dim == 576 and kind == "conv"
                                                  and "transposed" not in consumer)
    # channel 3 (and 7: grouped convs lose the same position in every group)
    idxs = [3, 7] if consumer == "grouped" else [3]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=test)
    fn = tp.prune_conv_out_channels if kind == "conv" else tp.prune_linear_out_channels
    with kcp_plugin.track_pruning():
        graph.get_pruning_group(model[0], fn, idxs=idxs).prune()
    pruned_out = model(test).detach()
    scale = dense_out.abs().max()
    assert (pruned_out - dense_out).abs().max() > 0.05 * scale  # pruning alone does hurt
    report = compensate(model, stats, eps=1e-9)
    assert list(report) == ["1"] and report["1"]["in_after"] == 8 - len(idxs)
    assert report["1"]["error_compensated"] < 1e-6 < report["1"]["error_pruned"]
    assert torch.allclose(model(test), dense_out, atol=1e-4 * float(scale), rtol=0)


def test_compensation_with_the_default_ridge_is_near_exact_and_idempotent():
    model = nn.Sequential(_redundant_producer("conv"), nn.Conv2d(8, 5, 3, padding=1)).eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    test = torch.randn(2, 3, 12, 12)
    dense_out = model(test).detach()
    with compensating(model, data, progress=False) as comp:
        kcp_plugin.prune(model, test, _FixedScores({3: 0.0}), pruning_ratio=0.125,
                         progress=False)
    assert model[1].in_channels == 7
    first = model(test).detach()
    assert torch.allclose(first, dense_out, atol=1e-3 * float(dense_out.abs().max()))
    weight = model[1].weight
    again = compensate(model, comp.stats)  # from the dense weights again: same result
    assert model[1].weight is weight  # updated in place: optimizers / lineage stay valid
    assert torch.allclose(model(test), first, atol=1e-6) and list(again) == ["1"]


class _FixedScores(tp.importance.Importance):
    """Scores root channels from a dict (others 1): picks exactly the channels to prune."""

    def __init__(self, low: dict[int, float]):
        self.low = low

    def __call__(self, group):
        scores = torch.ones(len(group[0].idxs))
        for i, v in self.low.items():
            if i < len(scores):
                scores[i] = v
        return scores


def test_compensation_composes_lineage_over_several_prunes():
    model = nn.Sequential(_redundant_producer("conv"), nn.Conv2d(8, 5, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(5, 2, 1)).eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    test = torch.randn(2, 3, 12, 12)
    mid_dense = model[:2](test).detach()
    with compensating(model, data, progress=False) as comp:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=test)
        with kcp_plugin.track_pruning():
            graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[3]).prune()
            # the consumer then loses an output channel, and later another input channel
            graph.get_pruning_group(model[1], tp.prune_conv_out_channels, idxs=[1]).prune()
            graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[6]).prune()
    assert model[1].weight.shape[:2] == (4, 6)
    assert set(comp.report) == {"1", "3"}  # model[3] lost its input channel 1
    out = model[:2](test)
    kept_rows = [0, 2, 3, 4]
    # channel 3 is recoverable exactly; channel 7 (dense index, removed second) is not, so the
    # result is the best repair: far better than without compensation
    naive = copy.deepcopy(model)
    naive[1].weight.data = comp.stats.layer_params()["1"][0].detach()[kept_rows][
        :, [0, 1, 2, 4, 5, 7]].clone()
    naive[1].bias.data = comp.stats.layer_params()["1"][1].detach()[kept_rows].clone()
    err = (out - mid_dense[:, kept_rows]).pow(2).mean()
    err_naive = (naive[:2](test) - mid_dense[:, kept_rows]).pow(2).mean()
    assert err < 0.5 * err_naive
    assert comp.report["1"]["in_after"] == 6


# ---------------------------------------------------------------------- (2) formulas
def _direct_loss(cov: np.ndarray, w: np.ndarray, keep: list[int]) -> float:
    total = np.trace(w @ cov @ w.T)
    if not keep:
        return float(total)
    a, b = cov[np.ix_(keep, keep)], cov[keep] @ w.T
    return float(total - np.trace(b.T @ np.linalg.solve(a, b)))


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_gains_equal_the_actual_loss_reductions(k):
    rng = np.random.default_rng(0)
    c, rows = 6, 4
    x = rng.standard_normal((200, c * k)) @ rng.standard_normal((c * k, c * k))
    cov = np.cov(x, rowvar=False)
    w = rng.standard_normal((rows, c * k))
    order, gains = greedy_selection([(torch.tensor(cov), torch.tensor(w))], k, eps=0.0)
    assert sorted(ch for _, ch in order) == list(range(c))
    kept: list[int] = []

    def dims(chs):
        return [ch * k + t for ch in chs for t in range(k)]

    for (_, ch), gain in zip(order, gains):
        before = _direct_loss(cov, w, dims(kept))
        reductions = {j: before - _direct_loss(cov, w, dims(kept + [j]))
                      for j in range(c) if j not in kept}
        assert gain == pytest.approx(reductions[ch], rel=1e-8, abs=1e-8)
        assert reductions[ch] == pytest.approx(max(reductions.values()), rel=1e-10)
        kept.append(ch)
    assert sum(gains) == pytest.approx(np.trace(w @ cov @ w.T), rel=1e-8)


def test_blocks_are_ranked_together_as_a_block_diagonal_problem():
    rng = np.random.default_rng(1)
    covs = [np.cov(rng.standard_normal((100, 3)) * s, rowvar=False) for s in (1.0, 3.0)]
    ws = [rng.standard_normal((2, 3)) for _ in covs]
    order, gains = greedy_selection([(torch.tensor(c), torch.tensor(w)) for c, w in
                                     zip(covs, ws)], 1)
    assert len(order) == 6 and sorted(order) == [(b, j) for b in (0, 1) for j in range(3)]
    # the union's loss is the sum of the blocks' losses: the first pick is the best single gain
    firsts = [greedy_selection([(torch.tensor(c), torch.tensor(w))], 1)[1][0]
              for c, w in zip(covs, ws)]
    assert gains[0] == pytest.approx(max(firsts), rel=1e-6)
    assert sum(gains) == pytest.approx(sum(np.trace(w @ c @ w.T) for c, w in zip(covs, ws)),
                                       rel=1e-4)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 3, 3, stride=2, padding=1, dilation=1),
    nn.Conv2d(4, 3, (3, 2), stride=(1, 2), padding=(2, 0), dilation=2),
    nn.Conv1d(4, 3, 5, padding=2, padding_mode="circular"),
    pytest.param(nn.Conv1d(4, 3, 4, padding="same"),  # torch warns about its own copy
                 marks=pytest.mark.filterwarnings("ignore:Using padding='same'")),
], ids=["2d_stride", "2d_dilated_rect", "1d_circular", "1d_same_even"])
def test_sampled_patches_are_the_unfolded_conv_inputs(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 10) if conv.weight.dim() == 4 else torch.randn(2, 4, 11)
    layout = layout_of(conv, 576)
    feats = sample_features(x, conv, layout, 10**6, torch.Generator())
    # the patches times the weight are the conv's output, position by position
    out = conv(x).detach()
    w = conv.weight.detach().reshape(3, -1)
    expected = out.movedim(1, -1).reshape(-1, 3) - conv.bias.detach()
    assert torch.allclose(feats @ w.t(), expected, atol=1e-5)


def test_collected_moments_match_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3,
                                                                              padding=1)).eval()
    data = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    imp = kcp_plugin.collect(model, data, CaPImportance(max_positions=10**6), progress=False)
    inputs = torch.cat([model[:2](x) for x in data]).detach()
    patches = F.unfold(inputs, 3, padding=1).transpose(1, 2).reshape(-1, 36).double()
    mean, cov = imp.moments("2", 0, centred=True)
    assert torch.allclose(mean, patches.mean(0), atol=1e-6)
    assert torch.allclose(cov, torch.cov(patches.t(), correction=0), atol=1e-5)
    _, second = imp.moments("2", 0, centred=False)
    assert torch.allclose(second, patches.t() @ patches / len(patches), atol=1e-5)


# ---------------------------------------------------------------------- (3) obvious choices
def _duplicate_net() -> nn.Module:
    """Producer of 6 channels: channel 5 duplicates channel 2; channel 0 is large and read
    with large weights (informative)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    with torch.no_grad():
        model[0].weight[5] = model[0].weight[2]
        model[0].bias[5] = model[0].bias[2]
        model[0].weight[0] *= 4
        model[2].weight[:, 0] *= 4
    return model.eval()


@pytest.mark.parametrize("score", ["gain", "rank"])
def test_cap_prunes_a_duplicate_channel_first_and_keeps_the_informative_one(score):
    model = _duplicate_net()
    data = [_smooth_images(4, 12, seed=s) for s in range(3)]
    kcp_plugin.prune(model, data[0][:1], "cap", pruning_ratio=0.1, data=data,
                     importance_kwargs={"score": score}, progress=False)
    assert model[0].out_channels == 5
    assert _removed_inputs(model) in ([2], [5])  # one of the duplicates went, not channel 0


def _removed_inputs(model: nn.Module) -> list[int]:
    """Input channels of the consumer removed since :func:`_duplicate_net` built it (the
    consumer's columns are distinct, unlike the duplicated producer filters)."""
    dense = _duplicate_net()[2].weight.detach().transpose(0, 1).flatten(1)
    now = model[2].weight.detach().transpose(0, 1).flatten(1)
    kept = {int((dense - col).abs().sum(1).argmin()) for col in now}
    return sorted(set(range(dense.shape[0])) - kept)


def test_the_duplicate_test_discriminates_magnitude_from_cap():
    # l2 keeps both copies of channel 2 (it removes the smallest filter): the check above is
    # one that a criterion blind to redundancy fails
    model = _duplicate_net()
    kcp_plugin.prune(model, torch.randn(1, 3, 12, 12), "l2", pruning_ratio=0.1, progress=False)
    assert _removed_inputs(model) not in ([2], [5], [0])


def test_cap_scores_a_group_from_all_its_consumers():
    torch.manual_seed(0)
    model = ResBlockNet(width=8).eval()
    data = [_smooth_images(2, 8, seed=s) for s in range(2)]
    imp = kcp_plugin.collect(model, data, CaPImportance(), progress=False)
    imp.bind(model)
    graph = kcp_plugin.graph.build_graph(model, data[0])
    group = graph.get_pruning_group(model.stem[0], tp.prune_conv_out_channels, list(range(8)))
    consumers = [dep.target.module for dep, _ in group if dep.pruning_fn in CONSUMER_FNS]
    assert {model.b1[0], model.b2[0], model.fc} <= set(consumers)
    per_layer = [imp.layer_scores(m) for m in (model.b1[0], model.b2[0], model.fc)]
    expected = torch.stack(per_layer).mean(0).float()
    # the residual group's consumers (stem readers of both blocks and the head) are averaged
    assert torch.allclose(imp(group), expected, atol=1e-6)


# ---------------------------------------------------------------------- (4) real models
@pytest.mark.parametrize("builder,shape,kwargs", [
    (lambda: ResBlockNet(width=16), (2, 3, 16, 16), {"target_macs_ratio": 0.5}),
    (lambda: TinySeg(w=16), (2, 3, 16, 16), {"pruning_ratio": 0.5}),
    (lambda: build_model("deeplabv3_lite", width=8), (2, 3, 32, 32), {"pruning_ratio": 0.3}),
], ids=["resblock", "tinyseg", "deeplabv3_lite"])
def test_prune_with_cap_runs_on_models(builder, shape, kwargs):
    torch.manual_seed(0)
    model = builder().eval()
    data = [_smooth_images(shape[0], shape[2], seed=s) for s in range(2)]
    x = data[0][:1]
    out_shape = model(x).shape
    report = kcp_plugin.prune(model, x, "cap", data=data, data_steps=2, progress=False,
                              **kwargs)
    assert report.macs_after < report.macs_before and model(x).shape == out_shape
    if "target_macs_ratio" in kwargs:
        assert abs(report.macs_ratio - kwargs["target_macs_ratio"]) <= 0.02


def test_tinyseg_layouts_cover_grouped_transposed_and_skip_depthwise():
    model = TinySeg(w=16).eval()
    imp = kcp_plugin.collect(model, [torch.randn(2, 3, 16, 16)], CaPImportance(),
                             progress=False)
    assert imp.layout("enc.3") is None  # depthwise: not a consumer
    assert imp.layout("enc.9").groups == 4 and len(imp.layout("enc.9").blocks) == 4
    assert imp.layout("up").kind == "conv_transpose" and imp.layout("up").mode == "channel"
    assert imp.layout("head").mode == "patch"


# ---------------------------------------------------------------------- (5) compensation helps
@pytest.mark.parametrize("criterion", ["kcp", "l2"])
def test_compensation_lowers_the_output_error_on_held_out_data(criterion):
    torch.manual_seed(0)
    dense = ResBlockNet(width=16).eval()
    train = [_smooth_images(8, 16, seed=s) for s in range(4)]
    held_out = [_smooth_images(8, 16, seed=100 + s) for s in range(2)]
    x = train[0][:1]

    def error(model):
        with torch.no_grad():
            return sum(float((model(h) - dense(h)).pow(2).mean()) for h in held_out)

    plain = copy.deepcopy(dense)
    kcp_plugin.prune(plain, x, criterion, pruning_ratio=0.3, progress=False)
    comp_model = copy.deepcopy(dense)
    with compensating(comp_model, train, progress=False) as comp:
        kcp_plugin.prune(comp_model, x, criterion, pruning_ratio=0.3, progress=False)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in comp_model.parameters()]
    assert len(comp.report) >= 4 and not comp.skipped
    assert all(r["error_compensated"] < r["error_pruned"] for r in comp.report.values())
    assert error(comp_model) < 0.5 * error(plain)


def test_cap_statistics_compensate_after_a_cap_prune():
    torch.manual_seed(0)
    dense = ResBlockNet(width=16).eval()
    train = [_smooth_images(8, 16, seed=s) for s in range(4)]
    held_out = _smooth_images(8, 16, seed=100)
    model = copy.deepcopy(dense)
    imp = CaPImportance()
    kcp_plugin.prune(model, train[0][:1], imp, pruning_ratio=0.3, data=train, progress=False)
    with torch.no_grad():
        before = float((model(held_out) - dense(held_out)).pow(2).mean())
    compensate(model, imp)
    with torch.no_grad():
        after = float((model(held_out) - dense(held_out)).pow(2).mean())
    assert after < 0.5 * before


def test_rescale_restores_each_output_rows_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    data = [_smooth_images(4, 12, seed=s) for s in range(3)]
    stats = collect_compensation_stats(model, data, max_positions=10**6, progress=False)
    var_dense = torch.cat([model(x) for x in data]).detach().transpose(0, 1).flatten(1).var(1)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=data[0])
    with kcp_plugin.track_pruning():
        graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[0, 1, 2]).prune()
    compensate(model, stats, rescale=True, eps=1e-9)
    var_new = torch.cat([model(x) for x in data]).detach().transpose(0, 1).flatten(1).var(1)
    assert torch.allclose(var_new, var_dense, rtol=1e-3)


# ---------------------------------------------------------------------- (6) memory bound
def test_max_dim_and_max_positions_bound_the_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),  # 8 ch x 9 taps = 72
                          nn.Conv2d(8, 48, 3, padding=1), nn.ReLU(),  # 48 x 9: channel mode
                          nn.Conv2d(48, 4, 1)).eval()  # 48 channels: blocks 20, 20, 8
    data = [torch.randn(2, 3, 10, 10) for _ in range(3)]
    imp = kcp_plugin.collect(model, data, CaPImportance(max_dim=20, max_positions=50),
                             progress=False)
    modes = {n: (imp.layout(n).mode, [len(b) for b in imp.layout(n).blocks])
             for n in ("0", "2", "4")}
    # 3 x 9 = 27 > 20 dims: per-pixel channel statistics; 48 channels > 20: three blocks
    assert modes == {"0": ("channel", [3]), "2": ("channel", [8]),
                     "4": ("channel", [20, 20, 8])}
    for name in ("0", "2", "4"):
        slot = imp._sums[name]
        assert float(slot["n"]) == 3 * 50  # 200 positions per batch, 50 sampled
        assert all(t.shape[-1] <= 20 for key, t in slot.items() if key.startswith("s2"))
        assert all(t.dtype == torch.float64 for t in slot.values())
    # with a looser bound, the 27, 72 and 48 patch dims fit, and every position is used
    full = kcp_plugin.collect(model, data, CaPImportance(max_dim=72, max_positions=10**6),
                              progress=False)
    assert [full.layout(n).mode for n in ("0", "2", "4")] == ["patch"] * 3
    assert float(full._sums["0"]["n"]) == 3 * 200
    assert full._sums["2"]["s2_0"].shape == (72, 72)


def test_position_sampling_is_seeded_and_statistics_are_sums_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    data = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    a = kcp_plugin.collect(model, data, CaPImportance(max_positions=30, seed=3), progress=False)
    b = kcp_plugin.collect(model, data, CaPImportance(max_positions=30, seed=3), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_tensors(), b.state_tensors()))
    # what DDP's all-reduce does: the statistics of two shards add up to those of the whole
    whole = kcp_plugin.collect(model, data, CaPImportance(max_positions=10**6), progress=False)
    half1 = kcp_plugin.collect(model, data[:2], CaPImportance(max_positions=10**6),
                               progress=False)
    half2 = kcp_plugin.collect(model, data[2:], CaPImportance(max_positions=10**6),
                               progress=False)
    for w, h1, h2 in zip(whole.state_tensors(), half1.state_tensors(), half2.state_tensors()):
        assert torch.allclose(w, h1 + h2, rtol=1e-10, atol=1e-8)


def _prune_cap_and_compensate(data: list[torch.Tensor]) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = ResBlockNet(width=8).eval()
    with compensating(model, data, max_positions=10**6, progress=False):
        kcp_plugin.prune(model, data[0][:1], "cap", pruning_ratio=0.3, data=data,
                         importance_kwargs={"max_positions": 10**6}, progress=False)
    return kcp_plugin.get_plan(model), model.state_dict()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = [_smooth_images(2, 8, seed=s) for s in range(4)][rank::world]
        plan, state = _prune_cap_and_compensate(data)
        torch.save({"plan": plan, "state": state}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_prune_and_compensate_identically(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    # fork: the ranks need no fresh interpreter (spawn re-imports torch, ~1 min on a busy CI)
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    plan, state = _prune_cap_and_compensate([_smooth_images(2, 8, seed=s) for s in range(4)])
    assert r0["plan"] == r1["plan"] == plan  # the ranks' shards add up to the whole data
    for key, value in state.items():
        assert torch.equal(r0["state"][key], r1["state"][key])
        assert torch.allclose(r0["state"][key].float(), value.float(), atol=1e-5), key


# ---------------------------------------------------------------------- (7) errors
def test_cap_without_data_gives_a_clear_error():
    model = ResBlockNet(width=8).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="scores channels from data"):
        kcp_plugin.prune(model, x, "cap", pruning_ratio=0.3)
    graph = kcp_plugin.graph.build_graph(model, x)
    group = graph.get_pruning_group(model.b2[0], tp.prune_conv_out_channels, [0])
    with pytest.raises(RuntimeError, match="none was collected"):
        CaPImportance()(group)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_dim": 0}, "max_dim"), ({"max_positions": 2.5}, "max_positions"),
    ({"eps": -1}, "eps"), ({"score": "order"}, "score must be one of gain, rank"),
])
def test_bad_cap_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kcp_plugin.get_importance("cap", **kwargs)


def test_compensation_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    data = [torch.randn(2, 3, 8, 8)]
    with pytest.raises(TypeError, match="CaPImportance"):
        compensate(model, kcp_plugin.get_importance("l2"))
    with pytest.raises(ValueError, match="no statistics were collected"):
        compensate(model, CaPImportance())
    with pytest.raises(ValueError, match="eps must be"):
        with compensating(model, data, eps=2.0, progress=False):
            pass
    stats = collect_compensation_stats(model, data, progress=False)
    assert compensate(model, stats) == {}  # nothing pruned: nothing to do
    # weights replaced by a prune nobody recorded
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=data[0])
    graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[1]).prune()
    with pytest.raises(ValueError, match="track_pruning"):
        compensate(model, stats)


def test_compensating_does_nothing_when_the_block_fails():
    model = nn.Sequential(_redundant_producer("conv"), nn.Conv2d(8, 5, 3, padding=1)).eval()
    data = [torch.randn(2, 3, 8, 8)]
    with pytest.raises(ValueError, match="give one of"):
        with compensating(model, data, progress=False) as comp:
            kcp_plugin.prune(model, data[0], "l2")
    assert comp.report == {} and model[1].in_channels == 8
