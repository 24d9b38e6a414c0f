"""Training-time pruning schedules: arithmetic, hard/soft/decay behaviour, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from conftest import ResBlockNet

import kcp_plugin
from kcp_plugin.bench import get_task
from kcp_plugin.schedule import PruningScheduler, ramp_targets


def test_ramp_arithmetic_reaches_the_target_exactly():
    assert ramp_targets(0.3, 4, "linear") == pytest.approx([0.825, 0.65, 0.475, 0.3])
    exp = ramp_targets(0.25, 2, "exponential")
    assert exp == pytest.approx([0.5, 0.25])
    agp = ramp_targets(0.2, 3, "agp")
    assert agp[-1] == 0.2 and agp[0] < 1 - (1 - 0.2) / 3  # AGP prunes fastest first
    asfp = ramp_targets(0.3, 4, "asfp")
    removed = [(1 - 0.3) * (1 - math.exp(-4 * i / 4)) / (1 - math.exp(-4)) for i in (1, 2, 3, 4)]
    assert asfp == pytest.approx([1 - r for r in removed]) and asfp[-1] == 0.3
    for ramp in ("linear", "exponential", "agp", "asfp"):
        t = ramp_targets(0.4, 5, ramp)
        assert t[-1] == 0.4 and all(a > b for a, b in zip(t, t[1:]))
    with pytest.raises(ValueError, match="ramp must be one of"):
        ramp_targets(0.5, 3, "cosine")


def test_pruning_points_fall_on_the_right_calls():
    model = ResBlockNet()
    s = PruningScheduler(model, torch.randn(1, 3, 16, 16), target_macs_ratio=0.5, num_prunes=3,
                         start=2, every=5)
    assert [c for c in range(20) if s.point_at(c) is not None] == [2, 7, 12]
    assert s.last_call == 12


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(model, opt, sched, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def test_hard_schedule_reaches_target_and_keeps_training():
    torch.manual_seed(0)
    model = ResBlockNet(width=32)
    x, y = _data()
    dense_macs = kcp_plugin.count_macs_params(model, x[:1])[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = PruningScheduler(model, x[:1], "kcp", target_macs_ratio=0.4, num_prunes=3, every=2,
                             optimizer=opt)
    _train(model, opt, sched, 7, x, y)
    assert sched.finished
    macs = kcp_plugin.count_macs_params(model, x[:1])[0]
    assert abs(macs / dense_macs - 0.4) <= 0.03
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())


def test_soft_schedule_zeroes_selected_channels_and_lets_them_regrow():
    torch.manual_seed(0)
    model = ResBlockNet(width=32)
    with torch.no_grad():  # as after training: BN shifts are not exactly 0, so a zeroed
        for m in model.modules():  # filter's channel still passes gradient through its ReLU
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.1)
    x, y = _data()
    sched = PruningScheduler(model, x[:1], "l2", target_macs_ratio=0.5, num_prunes=2,
                             mode="soft")
    assert sched.step()  # first point: soft
    zero_filters = (model.b2[0].weight.flatten(1).abs().sum(1) == 0).sum().item()
    assert zero_filters > 0 and model.b2[0].out_channels == 64  # nothing removed yet
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert (model.b2[0].weight.flatten(1).abs().sum(1) == 0).sum().item() < zero_filters
    assert sched.step()  # final point: hard
    assert model.b2[0].out_channels < 64


def test_decay_scales_exactly_the_channels_a_prune_would_remove():
    torch.manual_seed(0)
    model = ResBlockNet(width=32)
    x = torch.randn(1, 3, 16, 16)
    first = ramp_targets(0.6, 4)[0]  # the first decay point's target
    preview = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=first, dry_run=True,
                               macs_tolerance=0.05, progress=False)
    assert model.b2[0].out_channels == 64  # dry run leaves the model alone
    twin = copy.deepcopy(model)
    real = kcp_plugin.prune(twin, x, "kcp", target_macs_ratio=first, macs_tolerance=0.05,
                            progress=False)
    for name, idxs in preview.selected.items():
        assert real.widths_before.get(name, 0) - real.widths_after.get(name, 0) in (
            0, len(set(idxs)))
    name = next(n for n in sorted(preview.selected) if n != "fc")  # a layer it decays
    layer = dict(model.named_modules())[name]
    before = layer.weight.detach().clone()
    sched = PruningScheduler(model, x, "kcp", target_macs_ratio=0.6, num_prunes=4,
                             mode="decay", decay="linear")
    assert sched.alpha(0) == pytest.approx(0.75) and sched.alpha(3) == 0.0
    sched.step()
    sel = torch.tensor(sorted(set(preview.selected[name])))
    torch.testing.assert_close(layer.weight[sel], 0.75 * before[sel])
    keep = torch.tensor([i for i in range(layer.out_channels) if i not in set(sel.tolist())])
    torch.testing.assert_close(layer.weight[keep], before[keep])


def test_resume_mid_schedule_gives_the_same_final_plan(tmp_path):
    x, y = _data()

    def fresh():
        torch.manual_seed(0)
        m = ResBlockNet(width=32)
        o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        s = PruningScheduler(m, x[:1], "kcp", target_macs_ratio=0.4, num_prunes=3, every=2,
                             optimizer=o)
        return m, o, s

    model, opt, sched = fresh()
    _train(model, opt, sched, 7, x, y)
    uninterrupted = kcp_plugin.get_plan(model)

    model, opt, sched = fresh()
    _train(model, opt, sched, 3, x, y)  # stop after the second pruning point
    kcp_plugin.save_pruned(model, tmp_path / "ckpt.pt")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "state.pt")

    torch.manual_seed(123)  # a different process: nothing carried over but the files
    model2 = kcp_plugin.load_pruned(ResBlockNet(width=32), tmp_path / "ckpt.pt", x[:1])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    opt2.load_state_dict(state["opt"])
    sched2 = PruningScheduler(model2, x[:1], "kcp", target_macs_ratio=0.4, num_prunes=3,
                              every=2, optimizer=opt2)
    sched2.load_state_dict(state["sched"])
    _train(model2, opt2, sched2, 4, x, y)
    assert kcp_plugin.get_plan(model2) == uninterrupted


def test_bad_schedules_are_refused():
    model = ResBlockNet()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="mode must be one of"):
        PruningScheduler(model, x, target_macs_ratio=0.5, mode="gentle")
    with pytest.raises(ValueError, match="target_macs_ratio"):
        PruningScheduler(model, x, target_macs_ratio=0.0)
    with pytest.raises(ValueError, match="every"):
        PruningScheduler(model, x, target_macs_ratio=0.5, every=0)
    with pytest.raises(ValueError, match="unknown importance"):
        PruningScheduler(model, x, "nope", target_macs_ratio=0.5)


@pytest.mark.parametrize("extra", [["--mode", "soft"], ["--regularizer", "greg1"]])
def test_plain_pytorch_example_runs(tmp_path, extra):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "train_with_schedule.py"
    spec = importlib.util.spec_from_file_location("train_with_schedule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "12", "--start", "2", "--num-prunes", "2",
                        "--target-macs", "0.5", "--out", str(tmp_path), *extra]) == 0
    model = kcp_plugin.load_pruned(lambda: get_task("segmentation").build(0),
                                   tmp_path / "pruned.pt", torch.randn(1, 3, 64, 64))
    macs = kcp_plugin.count_macs_params(model, torch.randn(1, 3, 64, 64))[0]
    assert macs < 0.55 * 20_070_000


def test_modes_answer_to_the_papers_names():
    from kcp_plugin.schedule import resolve_mode

    assert resolve_mode("SFP") == ("soft", "linear")
    assert resolve_mode("srfp", "agp") == ("decay", "agp")
    assert resolve_mode("ASRFP") == ("decay", "asfp")
    with pytest.raises(ValueError, match="'asfp' ramp"):
        resolve_mode("asrfp", "agp")
    with pytest.raises(ValueError, match="hard, soft, decay .*SFP, SRFP, ASRFP"):
        resolve_mode("sfpp")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    sched = PruningScheduler(model, torch.randn(1, 3, 16, 16), "l1", target_macs_ratio=0.5,
                             num_prunes=2, mode="ASRFP")
    assert (sched.mode, sched.ramp) == ("decay", "asfp")
