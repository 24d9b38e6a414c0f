"""No raw torch-pruning error reaches a caller (issue 25, kind 1): an error inside a group's
tracing protects that group by name; one inside pruning or a plan's replay becomes an
UnprunableError naming the upstream function, with the model left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import kcp_plugin.tracking as tracking
from kcp_plugin import UnprunableError, apply_plan, get_plan, prune
from kcp_plugin.depgraph import DependencyGraph


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return net.eval(), torch.randn(2, 3, 16, 16)


def test_a_group_whose_tracing_fails_upstream_is_protected_by_name(monkeypatch):
    model, x = _net()
    original = DependencyGraph.get_pruning_group

    def failing(self, module, fn, idxs):
        if module is model[3]:  # what torch-pruning's index_mapping.py raised on RT-DETR
            raise IndexError("list index out of range")
        return original(self, module, fn, idxs)

    monkeypatch.setattr(DependencyGraph, "get_pruning_group", failing)
    report = prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    assert model[3].out_channels == 32 and model[0].out_channels == 8
    [record] = [r for r in report.auto_protected if r["root"] == "3"]
    assert "IndexError: list index out of range" in record["reason"]


def test_a_raw_error_inside_torch_pruning_becomes_an_unprunable_error(monkeypatch):
    model, x = _net()
    before = copy.deepcopy(model.state_dict())
    upstream = tracking._original  # torch-pruning's BasePruningFunc._prune_parameter_and_grad

    def broken(self, weight, keep_idxs, dim):  # upstream indexes past the weight
        return upstream(self, weight, [10**6], dim)

    monkeypatch.setattr(tracking, "_original", broken)
    # every trial fails: the safety net protects each group (naming the error), and the MACs
    # target is refused, not an IndexError
    with pytest.raises(UnprunableError, match="IndexError") as info:
        prune(model, x, "l1", target_macs_ratio=0.5, progress=False)
    assert not isinstance(info.value, IndexError)
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before) and state.keys() == before.keys()
    assert get_plan(model)["history"] == []


def test_a_raw_error_replaying_a_plan_becomes_an_unprunable_error(monkeypatch):
    model, x = _net()
    prune(model, x, "l1", pruning_ratio=0.5, progress=False)
    plan = get_plan(model)
    fresh, _ = _net()
    upstream = tracking._original

    def broken(self, weight, keep_idxs, dim):
        return upstream(self, weight, [10**6], dim)

    monkeypatch.setattr(tracking, "_original", broken)
    with tracking.track_pruning(), pytest.raises(UnprunableError,
                                                 match="torch-pruning failed while replaying"):
        apply_plan(fresh, plan, x)
    assert fresh[0].out_channels == 16 and fresh[0].weight.shape[0] == 16


def test_tracking_puts_back_the_pruning_function_it_found(monkeypatch):
    # track_pruning used to put back the function it calls (tracking._original): a test that
    # replaced that one leaked a broken torch-pruning into every later test
    from torch_pruning.pruner.function import BasePruningFunc

    found = BasePruningFunc._prune_parameter_and_grad
    monkeypatch.setattr(tracking, "_original", lambda *args: None)
    with tracking.track_pruning():
        assert BasePruningFunc._prune_parameter_and_grad is tracking._tracked
    assert BasePruningFunc._prune_parameter_and_grad is found


class CatGrouped(nn.Module):
    """Two convs concatenated into a grouped conv of 4 groups: torch-pruning scores the group
    of ``a`` (10 channels) as ``imp.view(4, -1)`` and raises before pruning anything (NextViT's
    stages fail the same way)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 10, 1), nn.Conv2d(3, 6, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.g(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(torch.relu(self.c(y)))


def test_a_group_torch_pruning_fails_to_score_is_protected_by_name():
    # the failure comes before any group is pruned, so no prefix of pruned groups shows it:
    # the group being scored is the one to blame (was: "no single channel group could be
    # found responsible", a refusal naming no layer)
    torch.manual_seed(0)
    model, x = CatGrouped().eval(), torch.randn(1, 3, 16, 16)
    with pytest.warns(UserWarning, match="fails scoring its channels"):
        report = prune(model, x, "l1", target_macs_ratio=0.6, progress=False)
    assert abs(report.macs_ratio - 0.6) <= 0.02
    assert {r["root"] for r in report.auto_protected} == {"a", "b"}
    assert model.a.out_channels == 10 and model.c.out_channels < 16
