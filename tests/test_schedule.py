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


# --------------------------------------------------------------------------- latency target
def _clock(**costs) -> kcp_plugin.Backend:
    """The stand-in latency clock (tests/fake_clock.py): deterministic, no GPU, nothing
    timed; the latency tables, allocation and verification run as on a real backend."""
    from fake_clock import CostClock

    return kcp_plugin.Backend(timer=CostClock(**costs), runs=3)


def _net() -> nn.Module:
    """resnet20 at width 32 (as tests/test_latency_target.py): wide enough that the MACs
    points keep the backend's multiple (8), which the stand-in clock rewards."""
    from kcp_plugin.models import build_model

    torch.manual_seed(0)
    return build_model("resnet20", width=32).eval()


def _latency_kept(model: nn.Module, x: torch.Tensor) -> float:
    d, p = kcp_plugin.compare_latency([_net(), model], x, backend=_clock())
    return p.median_ms / d.median_ms


def _latency_scheduler(model, x, **kwargs):
    kwargs = {"target_latency_ratio": 0.6, "latency_backend": _clock(), "num_prunes": 2,
              "every": 1, **kwargs}
    return PruningScheduler(model, x, "l2", **kwargs)


def test_latency_target_is_reached_at_the_last_point(monkeypatch):
    """The first point follows the MACs ramp (to 0.6 read as MACs, with the backend's channel
    multiple); the last prunes the rest of the way to 0.6 of the dense latency, relative to
    the model the first point left, and records the outcome in its state."""
    import kcp_plugin.schedule as schedule

    calls = []
    real = schedule.prune

    def spy(model, x, importance, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("target_macs_ratio", "target_latency_ratio",
                                                 "latency_backend")})
        return real(model, x, importance, **kwargs)

    monkeypatch.setattr(schedule, "prune", spy)
    model = _net()
    x = torch.randn(1, 3, 32, 32)
    dense_macs = kcp_plugin.count_macs_params(model, x)[0]
    sched = _latency_scheduler(model, x)
    assert sched.targets == pytest.approx([0.8, 0.6])  # the ramp of the MACs points
    assert sched.step() and sched.latency is None
    first = calls[0]
    assert first["target_macs_ratio"] == pytest.approx(0.8) and first["target_latency_ratio"] \
        is None and first["latency_backend"] == _clock()
    assert abs(kcp_plugin.count_macs_params(model, x)[0] / dense_macs - 0.8) <= 0.05
    assert sched.step() and sched.finished
    last = calls[1]
    assert last["target_macs_ratio"] is None
    assert last["target_latency_ratio"] == pytest.approx(0.6 / sched.latency["earlier"])
    kept = _latency_kept(model, x)
    assert abs(kept - 0.6) <= 0.03, kept
    lat = sched.latency
    assert lat["ratio"] == pytest.approx(kept) and lat["target"] == 0.6 and lat["call"] == 1
    assert 0.6 < lat["earlier"] < 1.0 and lat["allocation"] == "table"
    assert sched.state_dict()["latency"] == lat
    assert sched.describe_latency("iter").startswith(
        f"latency target at iter 1: {lat['ratio']:.3f} of the dense model's latency (target "
        "0.6;")
    assert sched._dense is None  # the reference is dropped after the last point


def test_latency_target_one_shot_and_with_a_macs_cap():
    """One point: the latency target itself (nothing measured before); with a MACs cap the
    point keeps at most both fractions."""
    x = torch.randn(1, 3, 32, 32)
    model = _net()
    sched = _latency_scheduler(model, x, num_prunes=1)
    assert sched.step() and sched.latency["earlier"] == 1.0
    assert abs(_latency_kept(model, x) - 0.6) <= 0.03
    capped = _net()
    dense_macs = kcp_plugin.count_macs_params(capped, x)[0]
    sched = _latency_scheduler(capped, x, target_latency_ratio=0.9, target_macs_ratio=0.5)
    assert sched.targets == pytest.approx([0.75, 0.5])  # the MACs target sets the ramp
    assert sched.step() and sched.step()
    assert kcp_plugin.count_macs_params(capped, x)[0] / dense_macs <= 0.52
    assert sched.latency["ratio"] <= 0.9 + 0.03


def test_latency_target_resumes_mid_schedule(tmp_path):
    """Stopped between the MACs point and the latency point, and resumed in a new process
    from the checkpoint (model rebuilt pruned): the dense reference is what ``dense_model``
    builds, and the run ends with the plan of an uninterrupted one."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fresh = _net
    model = fresh()
    sched = _latency_scheduler(model, x)
    assert sched.step()
    kcp_plugin.save_pruned(model, tmp_path / "ckpt.pt")
    torch.save({"sched": sched.state_dict()}, tmp_path / "state.pt")
    assert sched.step()
    uninterrupted = kcp_plugin.get_plan(model)

    resumed = kcp_plugin.load_pruned(fresh(), tmp_path / "ckpt.pt", x)
    with pytest.raises(ValueError, match="pruned already: pass dense_model="):
        _latency_scheduler(resumed, x)  # refused before anything is measured
    built = []
    again = _latency_scheduler(resumed, x, dense_model=lambda: built.append(1) or fresh())
    state = torch.load(tmp_path / "state.pt", weights_only=True)["sched"]
    again.load_state_dict(state)
    assert again.calls == 1 and not built  # built at the latency point only
    assert again.step() and built == [1]
    assert kcp_plugin.get_plan(resumed) == uninterrupted
    assert again.latency["ratio"] == pytest.approx(sched.latency["ratio"])
    # a finished schedule resumed needs no reference; another latency target is refused
    done = _latency_scheduler(resumed, x, dense_model=fresh)
    done.load_state_dict(again.state_dict())
    assert done.finished and done._dense is None and done.latency == again.latency
    other = _latency_scheduler(resumed, x, dense_model=fresh, target_latency_ratio=0.5,
                               target_macs_ratio=0.6)
    with pytest.raises(ValueError, match="different schedule"):
        other.load_state_dict(again.state_dict())


def test_an_unreachable_latency_point_is_refused_in_the_users_terms():
    """The last point's target is relative to the model the earlier points left; its refusal
    names the user's target of the dense model, what the earlier points kept and what the
    last point needed; the model and the call counter stay as they were."""
    model = _net()
    x = torch.randn(1, 3, 32, 32)
    # the clock's latency is nearly all per-pass overhead: no width reaches 0.6 of it
    sched = _latency_scheduler(model, x, latency_backend=_clock(overhead_ms=1e4))
    assert sched.step()
    plan = copy.deepcopy(kcp_plugin.get_plan(model))
    with pytest.raises(kcp_plugin.TargetUnreachable,
                       match=r"target_latency_ratio=0.6 of the dense model: the earlier pruning "
                             r"points kept 0\.9\d+ of its latency, so the last point needed "
                             r"0\.6\d+ of the model as it was then, and: .*out of reach"):
        sched.step()
    assert kcp_plugin.get_plan(model) == plan and sched.calls == 1 and sched.latency is None
    # one-shot: nothing was kept before, the core's own message is the user's
    one = _latency_scheduler(_net(), x, num_prunes=1,
                             latency_backend=_clock(overhead_ms=1e4))
    with pytest.raises(kcp_plugin.TargetUnreachable, match=r"^target_latency_ratio=0\.6 is out"):
        one.step()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_latency_ratio=None), ValueError, "give target_macs_ratio .* or "
                                                  "target_latency_ratio"),
    (dict(target_latency_ratio=1.5), ValueError, r"target_latency_ratio must be in \(0, 1\]"),
    (dict(latency_backend="tensorrt"), ValueError,
     "unknown latency backend 'tensorrt'; valid: torch, onnxruntime, cuda"),
    (dict(latency_backend={"name": "cuda", "dtyp": "bf16"}), TypeError,
     "close matches: dtype"),
    (dict(latency_allocation="tabel"), ValueError, "valid: table, uniform"),
    (dict(target_macs_ratio=0.4, latency_allocation="uniform"), ValueError,
     "combines with latency_allocation='table' only"),
    (dict(prune_kwargs={"round_to": 8}), ValueError,
     "round_to: latency_allocation='table' chooses every group's width itself"),
    (dict(prune_kwargs={"latency_backend": "torch"}), ValueError,
     "PruningScheduler: latency_backend cannot be set in prune_kwargs: give .* as "
     "PruningScheduler's own arguments"),
    (dict(target_latency_ratio=None, target_macs_ratio=0.5, prune_kwargs={"round_to": "auto"}),
     ValueError, "round_to='auto' .* needs target_latency_ratio"),
    (dict(dense_model="resnet"), TypeError, "dense_model must be a module"),
])
def test_bad_latency_settings_are_refused_before_anything_runs(kwargs, error, match,
                                                                monkeypatch):
    import kcp_plugin.schedule as schedule

    def never(*args, **kwargs):
        raise AssertionError("measured or pruned before validating")

    monkeypatch.setattr(schedule, "compare_latency", never)
    monkeypatch.setattr(schedule, "prune", never)
    model = _net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        _latency_scheduler(model, torch.randn(1, 3, 32, 32), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_check_latency_arguments_is_model_free_and_names_the_owner():
    from kcp_plugin.pruning import check_latency_arguments

    assert check_latency_arguments() is None  # nothing asked: nothing measured
    assert check_latency_arguments(None, "cuda") == kcp_plugin.Backend("cuda")  # no GPU needed
    assert check_latency_arguments(0.5, {"name": "torch", "batch": 4}) == \
        kcp_plugin.Backend(batch=4)
    with pytest.raises(ValueError, match="^kcp_pruned: target_latency_ratio replaces "
                                         "pruning_ratio"):
        check_latency_arguments(0.5, pruning_ratio=0.3, owner="kcp_pruned")
    with pytest.raises(ValueError, match="global_pruning, isomorphic: latency_allocation='table'"):
        check_latency_arguments(0.5, prune_kwargs={"global_pruning": True, "isomorphic": True})
    # the runtime is checked only when asked, and only for a latency target
    if not torch.cuda.is_available():
        check_latency_arguments(0.5, "cuda")
        check_latency_arguments(None, "cuda", imports=True)
        with pytest.raises(ValueError, match="^Hook: latency backend 'cuda' needs an NVIDIA"):
            check_latency_arguments(0.5, "cuda", owner="Hook", imports=True)


def test_a_macs_schedule_with_a_backend_gives_it_to_every_point(monkeypatch):
    """No latency target: every point is a MACs point that rounds widths to the backend's
    channel multiple and measures the pruned model on it; no dense reference is kept."""
    import kcp_plugin.schedule as schedule

    backends = []
    real = schedule.prune

    def spy(model, x, importance, **kwargs):
        backends.append(kwargs.get("latency_backend"))
        return real(model, x, importance, **kwargs)

    monkeypatch.setattr(schedule, "prune", spy)
    model = _net()
    sched = PruningScheduler(model, torch.randn(1, 3, 32, 32), "l2", target_macs_ratio=0.5,
                             num_prunes=2, every=1, latency_backend=_clock())
    assert sched.latency_backend == _clock() and sched._dense is None
    assert sched.step() and sched.step()
    assert backends == [_clock(), _clock()]
    assert sched.latency is None and sched.describe_latency() is None
