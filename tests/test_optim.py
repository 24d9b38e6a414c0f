"""rebuild_optimizer: param groups re-pointed, per-parameter state carried for kept indices."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import ResBlockNet

import kcp_plugin


def _train_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _mark_state(opt):
    """Overwrite state with functions of the weights, so the right slice is known exactly."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v.copy_(p.detach() * 2 + 1 if k != "exp_avg_sq" else p.detach() ** 2 + 1)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW([{"params": ps[:4], "lr": 1e-2}, {"params": ps[4:]}], lr=1e-3),
], ids=["sgd", "adam", "adamw-2-groups"])
def test_state_is_carried_and_next_step_matches_a_fresh_optimizer(make):
    torch.manual_seed(0)
    model = ResBlockNet().train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    opt = make(list(model.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train_step(model, opt, x, y)
    _mark_state(opt)
    groups_before = [len(g["params"]) for g in opt.param_groups]

    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.5, progress=False)
    assert kcp_plugin.rebuild_optimizer(opt, model) is opt
    live = list(model.parameters())
    assert [p for g in opt.param_groups for p in g["params"]] == live
    assert [len(g["params"]) for g in opt.param_groups] == groups_before
    for p in live:  # the carried state is exactly the kept slice of the old state
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                want = p.detach() * 2 + 1 if k != "exp_avg_sq" else p.detach() ** 2 + 1
                torch.testing.assert_close(v, want, msg=f"state {k}")

    # a freshly built optimizer on the pruned model with the same state steps identically
    twin = ResBlockNet().train()
    kcp_plugin.apply_plan(twin, kcp_plugin.get_plan(model), x)
    twin.load_state_dict(model.state_dict())
    fresh = make(list(twin.parameters()))
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    sched.step()
    for g_new, g_old in zip(fresh.param_groups, opt.param_groups):
        g_new["lr"] = g_old["lr"]
    _train_step(model, opt, x, y)
    _train_step(twin, fresh, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_untracked_pruning_is_refused_and_optimizer_left_alone():
    model = ResBlockNet()
    x = torch.randn(1, 3, 16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    held = [p for g in opt.param_groups for p in g["params"]]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    with pytest.raises(RuntimeError, match="track_pruning"):
        kcp_plugin.rebuild_optimizer(opt, model)
    assert [p for g in opt.param_groups for p in g["params"]] == held


def test_track_pruning_makes_torch_pruning_pruners_carry_state():
    model = ResBlockNet()
    x = torch.randn(2, 3, 16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_step(model, opt, x, torch.tensor([0, 1]))
    _mark_state(opt)
    with kcp_plugin.track_pruning():
        pruner = tp.pruner.MetaPruner(model, x, importance=kcp_plugin.get_importance("kcp"),
                                      pruning_ratio=0.5, ignored_layers=[model.fc])
        pruner.step()
    kcp_plugin.rebuild_optimizer(opt, model)
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], p.detach() * 2 + 1)
