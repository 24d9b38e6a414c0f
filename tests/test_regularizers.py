"""Regularizers: gradients equal their formulas on whole coupled channels; schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import ResBlockNet

import kcp_plugin
from kcp_plugin.regularizers import GReg1, GReg2, IncReg, OrthoReg, channel_groups

X = torch.randn(1, 3, 16, 16)


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def test_channel_groups_cover_coupled_slices():
    model = ResBlockNet()
    groups = channel_groups(model, X)
    # the residual group: stem + both blocks' outputs (and norms), three readers
    (stem,) = [g for g in groups if any(p is model.stem[0].weight for p, *_ in g.slices)]
    params = {id(p) for p, *_ in stem.slices}
    assert len(stem.slices) == 15  # 3 convs (w, b), 3 BNs (w, b), 3 readers

    for m in (model.stem[0], model.b1[3], model.b2[3], model.b1[0], model.b2[0], model.fc):
        assert id(m.weight) in params
    assert "fc" not in {g.name for g in groups}  # the classifier's outputs are protected


def test_penalty_gradient_equals_lambda_times_weight_on_selected_channels():
    torch.manual_seed(0)
    model = ResBlockNet()
    reg = GReg1(model, X, pruning_ratio=0.5, delta=0.1, cap=1.0, interval=1)
    gi = [g.name for g in reg.groups].index("b2.0")  # b2's inner channels: 32 of them
    # only this group penalised (b2.0's input columns belong to the residual group)
    reg.masks = [m if i == gi else torch.zeros_like(m) for i, m in enumerate(reg.masks)]
    reg.step()  # penalty 0.1 on the selected half
    model.zero_grad()
    before = _grads(model)
    reg.apply()
    after = _grads(model)
    mask = reg.masks[gi]
    assert mask.sum() == 16
    w = model.b2[0].weight.detach()
    expected = torch.zeros_like(w)
    expected[mask] = 0.1 * w[mask]
    torch.testing.assert_close(after["b2.0.weight"] - before["b2.0.weight"], expected)
    w3 = model.b2[3].weight.detach()  # the consumer's kernels of those channels too
    expected3 = torch.zeros_like(w3)
    expected3[:, mask] = 0.1 * w3[:, mask]
    torch.testing.assert_close(after["b2.3.weight"] - before["b2.3.weight"], expected3)


def test_greg1_phases_and_the_penalised_set_is_what_l1_prunes():
    torch.manual_seed(0)
    model = ResBlockNet(width=16)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    reg = GReg1(model, x[:1], pruning_ratio=0.5, delta=0.5, cap=1.0, interval=2, stabilize=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    phases = []
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        reg.apply()
        opt.step()
        reg.step()
        phases.append(reg.phase)
    assert phases[0] == "grow" and "stabilize" in phases and phases[-1] == "done"
    assert reg.penalty == 1.0
    gi = [g.name for g in reg.groups].index("b2.0")
    chosen = set(torch.nonzero(reg.masks[gi]).flatten().tolist())
    norms = reg.groups[gi].channel_norms(1)
    assert max(norms[list(chosen)]) < min(norms[[i for i in range(32) if i not in chosen]])
    report = kcp_plugin.prune(model, x[:1], "l1", pruning_ratio=0.5, progress=False)
    assert report.widths_after["b2.0"] == 16


def test_greg2_starts_uniform_then_selects():
    model = ResBlockNet()
    reg = GReg2(model, X, pruning_ratio=0.25, delta_uniform=0.005, cap_uniform=0.01,
                interval=1)
    reg.step()
    assert reg.phase == "uniform" and all((lam == 0.005).all() for lam in reg.lams)
    reg.step()
    assert reg.selected and reg.phase == "grow"
    assert all(int(m.sum()) == int(0.25 * len(m)) for m in reg.masks)


def test_increg_increments_follow_rank():
    torch.manual_seed(0)
    model = ResBlockNet()
    reg = IncReg(model, X, pruning_ratio=0.5, delta=0.1, cap=0.15, interval=1)
    gi = [g.name for g in reg.groups].index("b2.0")
    rank = torch.argsort(torch.argsort(reg.groups[gi].channel_norms(1), stable=True))
    reg.step()
    lam = reg.lams[gi]
    weakest = int((rank == 0).nonzero())
    assert lam[weakest] == pytest.approx(0.1)
    assert (lam[rank >= 16] == 0).all() and (lam[rank < 16] > 0).all()
    reg.step()
    assert lam.max() <= 0.15 and reg.lams[gi][weakest] == pytest.approx(0.15)


def test_orthoreg_loss_and_gradient_match_a_direct_computation():
    torch.manual_seed(0)
    model = ResBlockNet()
    reg = OrthoReg(model, X, weight=0.01)
    loss = reg.loss()
    direct = torch.zeros(())
    for g, lam in zip(reg.groups, reg.group_weights):
        f = reg.filters(g)
        direct = direct + lam * (f @ f.t() - torch.eye(g.channels)).abs().sum()
    torch.testing.assert_close(loss, 0.01 * direct)
    gi = [g.name for g in reg.groups].index("b2.0")
    lam = reg.group_weights[gi]
    w = model.b2[0].weight
    model.zero_grad()
    loss.backward()
    f = w.detach().flatten(1)
    expected = 0.01 * lam * 2 * torch.sign(f @ f.t() - torch.eye(32)) @ f
    torch.testing.assert_close(w.grad.flatten(1), expected, rtol=1e-4, atol=1e-6)


def test_state_round_trip_and_bad_arguments():
    model = ResBlockNet()
    reg = GReg1(model, X, delta=0.2, interval=1)
    for _ in range(3):
        reg.step()
    twin = GReg1(model, X, delta=0.2, interval=1)
    twin.load_state_dict(reg.state_dict())
    assert twin.penalty == reg.penalty and twin.iteration == 3
    assert all(torch.equal(a, b) for a, b in zip(twin.masks, reg.masks))
    with pytest.raises(ValueError, match="pruning_ratio"):
        GReg1(model, X, pruning_ratio=1.0)
    with pytest.raises(ValueError, match="interval"):
        IncReg(model, X, interval=0)
