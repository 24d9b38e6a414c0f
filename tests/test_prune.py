"""kcp_plugin.prune: targets, protection, validation before mutation, atomicity."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import ResBlockNet, Tiny3D, TinySeg

import kcp_plugin
from kcp_plugin.errors import CriterionError
from kcp_plugin.report import PruneReport
from kcp_plugin.safety import UnprunableError


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, state, params):
    assert list(model.parameters()) == params  # same objects, same order
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


@pytest.mark.parametrize("builder,shape", [
    (lambda: ResBlockNet(width=32), (1, 3, 16, 16)), (lambda: TinySeg(w=64), (1, 3, 16, 16)),
    (lambda: Tiny3D(w=32), (1, 4, 6, 8, 8)),
], ids=["resnet", "seg", "3d"])
@pytest.mark.parametrize("target", [0.5, 0.3])
def test_target_macs_is_reached_within_tolerance(builder, shape, target):
    # Channel counts must be fine enough for a 2% MACs step (tiny layers are refused, below).
    torch.manual_seed(0)
    model = builder().eval()
    x = torch.randn(*shape)
    out_shape = model(x).shape
    report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=target, progress=False)
    assert abs(report.macs_ratio - target) <= 0.02
    assert report.macs_after == kcp_plugin.count_macs_params(model, x)[0]
    assert model(x).shape == out_shape


def test_too_coarse_widths_give_a_clear_error_and_no_change():
    model = TinySeg().eval()
    state, params = _state(model), list(model.parameters())
    with pytest.raises(ValueError, match="too coarse"):  # no setting within 1e-4
        kcp_plugin.prune(model, torch.randn(1, 3, 16, 16), target_macs_ratio=0.5,
                         round_to=1, macs_tolerance=1e-4, progress=False)
    _assert_untouched(model, state, params)
    # plain widths reach 2% (a group that jumps over the target is pinned, the rest searched)
    plain = kcp_plugin.prune(copy.deepcopy(model), torch.randn(1, 3, 16, 16),
                             target_macs_ratio=0.5, round_to=1, progress=False)
    assert abs(plain.macs_ratio - 0.5) <= 0.02
    # the default tries the net's channel multiple too, which reaches it here
    report = kcp_plugin.prune(model, torch.randn(1, 3, 16, 16), target_macs_ratio=0.5,
                              progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02 and report.round_to == 2


def test_global_and_iterative_kcp_reach_the_target():
    model = ResBlockNet(width=24).eval()
    x = torch.randn(1, 3, 16, 16)
    report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.4, global_pruning=True,
                              iterative_steps=3, progress=False)
    assert abs(report.macs_ratio - 0.4) <= 0.02
    assert len(report.plan["history"]) > 0


def test_output_layers_are_protected_automatically():
    torch.manual_seed(0)
    seg, res, vol = TinySeg().eval(), ResBlockNet().eval(), Tiny3D().eval()
    r1 = kcp_plugin.prune(seg, torch.randn(1, 3, 16, 16), "l2", pruning_ratio=0.5,
                          progress=False)
    r2 = kcp_plugin.prune(res, torch.randn(1, 3, 16, 16), "l2", pruning_ratio=0.5,
                          progress=False)
    r3 = kcp_plugin.prune(vol, torch.randn(1, 4, 4, 8, 8), "l2", pruning_ratio=0.5,
                          progress=False)
    assert r1.protected == ["head"] and seg.head.out_channels == 4
    assert r2.protected == ["fc"] and res.fc.out_features == 5
    assert r3.protected == ["out"] and vol.out.out_channels == 1
    assert seg.enc[0].out_channels == 8 and res.b2[0].out_channels == 16


def test_torchvision_segmentation_dict_outputs_are_protected():
    import torchvision as tv  # installed by the test command (an extra)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None,
                                                               weights_backbone=None).eval()
    x = torch.randn(1, 3, 64, 64)
    report = kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.3, progress=False)
    assert set(report.protected) == {"classifier.low_classifier", "classifier.high_classifier"}
    assert model(x)["out"].shape == (1, 21, 64, 64)


def test_report_contents_and_plot(tmp_path):
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert isinstance(report, PruneReport)
    assert report.widths_before["b2.0"] == 32 and report.widths_after["b2.0"] < 32
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert "MACs" in report.table() and "Params" in report.table()
    assert report.search and abs(report.search[-1][1] - report.macs_ratio) < 1e-9
    path = tmp_path / "widths.png"
    report.plot_widths(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = report.to_dict()
    assert d["macs_ratio"] == report.macs_ratio


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "give one of"),
    (dict(target_macs_ratio=0.5, pruning_ratio=0.5), "not both"),
    (dict(target_macs_ratio=1.5), r"target_macs_ratio must be in \(0.0, 1.0\]"),
    (dict(pruning_ratio=1.0), r"pruning_ratio must be in \[0.0, 1.0\)"),
    (dict(pruning_ratio=0.5, importance="kcpp"), "close matches: kcp. Valid names:"),
    (dict(pruning_ratio=0.5, importance_kwargs={"centr": "mean"}), "accepted arguments"),
    (dict(pruning_ratio=0.5, ignored_layers=["b3.0"]), "no layer named 'b3.0'"),
    (dict(pruning_ratio=0.5, iterative_steps=0), "iterative_steps"),
    (dict(pruning_ratio=0.5, round_to=0), "round_to"),
    (dict(pruning_ratio=0.5, isomorphic=True), "global_pruning=True"),
    (dict(pruning_ratio=0.5, importance="taylor"), "loss_fn"),
    (dict(pruning_ratio=0.5, example_inputs=torch.randn(1, 4, 16, 16)), "could not be run"),
    (dict(target_macs_ratio=0.01, max_pruning_ratio=0.5), "out of reach"),
])
def test_bad_arguments_raise_before_the_model_is_touched(kwargs, match):
    model = ResBlockNet().train()
    state, params = _state(model), list(model.parameters())
    args = {"example_inputs": torch.randn(1, 3, 16, 16), "importance": "kcp", **kwargs}
    with pytest.raises(ValueError, match=match):
        kcp_plugin.prune(model, progress=False, **args)
    _assert_untouched(model, state, params)
    assert model.training and all(m.training for m in model.modules())


class _FailsOnThirdGroup(tp.importance.GroupMagnitudeImportance):
    def __init__(self, exc):
        super().__init__()
        self.calls, self.exc = 0, exc

    def __call__(self, group):
        self.calls += 1
        if self.calls == 3:
            raise self.exc
        return super().__call__(group)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_mid_prune_restores_the_model(exc):
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    expected = model(x)
    state, params = _state(model), list(model.parameters())
    # an error is the plugin's refusal with the criterion's error as its cause; Ctrl-C is
    # passed on as it is
    raised = UnprunableError if isinstance(exc, Exception) else type(exc)
    with pytest.raises(raised) as info:
        kcp_plugin.prune(model, x, _FailsOnThirdGroup(exc), pruning_ratio=0.5, progress=False)
    if isinstance(exc, Exception):
        assert info.value.__cause__ is exc
    _assert_untouched(model, state, params)
    assert model.stem[0].out_channels == 16 and model.b2[0].in_channels == 16
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.5, progress=False)  # still prunable
    assert model.stem[0].out_channels == 8


@pytest.mark.parametrize("criterion, kwargs, says", [
    # cdc on a regression task (the stereo benchmark's case): its own check of the labels
    ("cdc", {"data": [(torch.randn(4, 3, 16, 16), torch.rand(4))]},
     "ValueError: cdc needs class labels"),
    # a loss_fn with the step_fn signature
    ("taylor", {"loss_fn": lambda model, batch: model(batch).sum()},
     "TypeError: .*missing 1 required positional argument"),
    # data batches the default step cannot unpack
    ("fisher", {"data": [torch.randn(4, 3, 16, 16)]}, "fisher|Fisher"),
])
def test_bad_criterion_inputs_are_the_criterions_error_not_the_models(criterion, kwargs, says):
    """What a gradient / data criterion is fed fails before any channel is pruned: a
    CriterionError naming the original error and how prune() calls loss_fn / step_fn, not
    "pruning breaks this model" (an UnprunableError about the model's structure); the model is
    left unchanged."""
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    state, params = _state(model), list(model.parameters())
    with pytest.raises(CriterionError, match=says) as info:
        kcp_plugin.prune(model, x, criterion, pruning_ratio=0.5, progress=False, **kwargs)
    assert "nothing was pruned" in str(info.value)
    # how prune() calls loss_fn / step_fn: only where the caller's code failed, not after the
    # plugin's own ValueErrors (cdc's label check, the default step's)
    own = isinstance(info.value.__cause__, ValueError)
    assert ("loss_fn(model)" in str(info.value)) is not own
    assert not isinstance(info.value, UnprunableError) and info.value.__cause__ is not None
    _assert_untouched(model, state, params)


def test_training_mode_and_frozen_parameters_are_preserved():
    model = ResBlockNet().train()
    model.stem[0].weight.requires_grad_(False)
    kcp_plugin.prune(model, torch.randn(2, 3, 16, 16), "kcp", pruning_ratio=0.5, progress=False)
    assert all(m.training for m in model.modules())
    assert not model.stem[0].weight.requires_grad and model.b1[0].weight.requires_grad


def test_gradient_criteria_use_loss_fn():
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    calls = []

    def loss_fn(m):
        calls.append(1)
        return nn.functional.cross_entropy(m(x), y)

    report = kcp_plugin.prune(model, x, "taylor", pruning_ratio=0.5, loss_fn=loss_fn,
                              iterative_steps=2, progress=False)
    assert len(calls) == 2 and report.params_after < report.params_before

    hessian_model = ResBlockNet().eval()
    kcp_plugin.prune(hessian_model, x, "hessian", pruning_ratio=0.5, progress=False,
                     loss_fn=lambda m: nn.functional.cross_entropy(m(x), y, reduction="none"))
    assert hessian_model.stem[0].out_channels == 8


def test_hessian_accumulates_gradients():
    imp = kcp_plugin.get_importance("hessian")
    model = nn.Linear(3, 2)
    grads = [torch.ones(2, 3), 2 * torch.ones(2, 3)]
    for g in grads:
        model.weight.grad = g.clone()
        model.bias.grad = None
        imp.accumulate_grad(model)
    torch.testing.assert_close(imp._accu_grad[model.weight], torch.full((2, 3), 5.0))
    assert imp._counter[model.weight] == 2


def test_timm_vit_prunes_with_consistent_heads():
    import timm  # installed by the test command (an extra); missing means a failure
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    report = kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.25, progress=False)
    assert report.params_after < report.params_before
    for blk in model.blocks:
        attn = blk.attn
        assert attn.num_heads == 3
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
        assert attn.proj.in_features == attn.num_heads * attn.head_dim == attn.attn_dim
        assert attn.head_dim == 48  # 64 * 0.75
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    for blk in model.blocks:  # fused and unfused attention agree after the update
        blk.attn.fused_attn = False
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


def test_timm_vit_whole_head_pruning():
    import timm  # installed by the test command (an extra); missing means a failure
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    # torch-pruning removes heads only in a step that also prunes widths
    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.25, prune_num_heads=True,
                     head_pruning_ratio=1 / 3, progress=False)
    for blk in model.blocks:
        attn = blk.attn
        assert attn.num_heads == 2
        assert attn.qkv.out_features == 3 * 2 * attn.head_dim
        assert attn.proj.in_features == 2 * attn.head_dim
    assert model(x).shape == (1, 10)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_narrow_networks_reach_the_target_by_mixing_group_ratios(target):
    # one channel of this 16-channel stereo net moves the MACs by more than the tolerance
    from kcp_plugin.models import build_model, example_inputs

    model = build_model("stereo_lite", width=8)
    x = example_inputs("stereo_lite")
    report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=target,
                              forward_fn=lambda m, inp: m(*inp), progress=False)
    assert abs(report.macs_ratio - target) <= 0.02
    assert model(*x).shape == (1, 64, 128)


def test_untraceable_model_gets_a_tracing_error_not_an_input_error(monkeypatch):
    # a tracer failure is the plugin's UnprunableError naming where it failed (ShuffleNet's
    # channel shuffle used to be one; it is now traced and its groups protected, see
    # test_any_net): inject one into torch-pruning's tracing
    from torch_pruning.dependency import graph as tp_graph

    model = ResBlockNet().eval()
    state, params = _state(model), list(model.parameters())
    real = tp_graph.DependencyGraph._build_dependency

    def broken(self, module2node):
        for node in module2node.values():  # noqa: B007 (the failing node, for the message)
            if node.module is model.b1[0]:
                raise ZeroDivisionError("injected")
        return real(self, module2node)

    monkeypatch.setattr(tp_graph.DependencyGraph, "_build_dependency", broken)
    with pytest.raises(UnprunableError, match=r"could not trace this model's channel "
                       r"dependencies \(ZeroDivisionError: injected\) at b1\.0") as info:
        kcp_plugin.prune(model, torch.randn(1, 3, 16, 16), "kcp", pruning_ratio=0.3,
                         progress=False)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    _assert_untouched(model, state, params)


def test_channel_attention_is_not_taken_for_token_attention():
    from kcp_plugin.attention import detect_num_heads

    class XCA(nn.Module):  # timm's cross-covariance attention has these attributes
        def __init__(self):
            super().__init__()
            self.num_heads = 4
            self.qkv = nn.Linear(16, 48)
            self.temperature = nn.Parameter(torch.ones(4, 1, 1))

    class Token(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4
            self.qkv = nn.Linear(16, 48)

    model = nn.Sequential(XCA(), Token())
    assert detect_num_heads(model) == {model[1].qkv: 4}


def _pixel_loss_fn(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y, reduction="none")


def test_hessian_takes_per_sample_losses_from_a_per_pixel_loss():
    """A (N, H, W) per-pixel loss is averaged to (N,) per-sample losses: one backward per
    sample (not one per pixel: 17+ minutes on a real segmentation batch), with the gradients of
    the per-sample mean losses; (N,) losses take the path they always took."""
    from kcp_plugin.run import populate_gradients

    torch.manual_seed(0)
    model = TinySeg().eval()
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2, 16, 16))
    pixel = kcp_plugin.get_importance("hessian")
    populate_gradients(model, pixel, _pixel_loss_fn(x, y))
    assert set(pixel._counter.values()) == {2}  # 512 (one per pixel) before
    per_sample = kcp_plugin.get_importance("hessian")
    populate_gradients(model, per_sample, lambda m: _pixel_loss_fn(x, y)(m).mean((1, 2)))
    assert per_sample._accu_grad.keys() == pixel._accu_grad.keys()
    for p, g in per_sample._accu_grad.items():
        torch.testing.assert_close(pixel._accu_grad[p], g)
    # the (N,) path: each sample's loss back-propagated alone, squared gradients summed
    expected = {p: torch.zeros_like(p) for p in model.parameters()}
    for i in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for p in model.parameters():
            expected[p] += p.grad.pow(2)
    for p, g in per_sample._accu_grad.items():
        torch.testing.assert_close(g, expected[p], rtol=1e-4, atol=1e-7)
    report = kcp_plugin.prune(model, x, "hessian", pruning_ratio=0.5, progress=False,
                              loss_fn=_pixel_loss_fn(x, y))
    assert report.params_after < report.params_before


def test_hessian_warns_that_a_scalar_loss_is_a_one_sample_estimate():
    from kcp_plugin.run import populate_gradients

    model = ResBlockNet().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    imp = kcp_plugin.get_importance("hessian")
    with pytest.warns(UserWarning, match=r"one-sample estimate.*per-sample losses of shape "
                                         r"\(N,\)"):
        populate_gradients(model, imp, lambda m: nn.functional.cross_entropy(m(x), y))
    assert set(imp._counter.values()) == {1}
    with warnings.catch_warnings():  # per-sample losses: no warning
        warnings.simplefilter("error")
        populate_gradients(model, imp, lambda m: nn.functional.cross_entropy(
            m(x), y, reduction="none"))
    assert set(imp._counter.values()) == {4}


class _CountsForwards(ResBlockNet):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize("one_batch", ["tensor", "pair"])
def test_one_batch_given_as_data_is_refused_before_the_model_runs(one_batch):
    """data=x (or data=(x, y)) would be iterated row by row and fail deep inside the model with
    a channel mismatch; it is an argument error naming the mistake, before the model runs."""
    model = _CountsForwards().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    data = x if one_batch == "tensor" else (x, y)
    state, params = _state(model), list(model.parameters())
    _CountsForwards.calls = 0
    for criterion in ("fisher", "cdc"):
        with pytest.raises(TypeError, match=r"data must be an iterable of batches \(a "
                           r"DataLoader, or a list of \(inputs, targets\) tuples\), got .*"
                           r"\(4, 3, 16, 16\).*data=\[\(inputs, targets\)\]"):
            kcp_plugin.prune(model, x, criterion, pruning_ratio=0.5, data=data, progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        kcp_plugin.collect(model, data, kcp_plugin.get_importance("fisher"))
    assert _CountsForwards.calls == 0
    _assert_untouched(model, state, params)
    # a list of batches is what works
    report = kcp_plugin.prune(model, x, "fisher", pruning_ratio=0.5, data=[(x, y)],
                              progress=False)
    assert report.params_after < report.params_before


def test_criterion_instances_are_named_by_registry_name_or_class():
    from kcp_plugin.importance.fisher import FisherImportance
    from kcp_plugin.importance.kcp import KCPImportance

    model, x = ResBlockNet().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"^importance 'fisher' scores channels from data") as e:
        kcp_plugin.prune(model, x, FisherImportance(), pruning_ratio=0.5)
    assert "object at" not in str(e.value)
    with pytest.raises(ValueError, match=r"^importance 'GroupTaylorImportance' reads gradients"):
        kcp_plugin.prune(model, x, tp.importance.GroupTaylorImportance(), pruning_ratio=0.5)
    with pytest.raises(ValueError, match=r"'GroupMagnitudeImportance' does not use them"):
        kcp_plugin.prune(model, x, tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
                         data=[(x, torch.tensor([1]))])
    report = kcp_plugin.prune(model, x, KCPImportance(), pruning_ratio=0.5, progress=False)
    assert report.importance == "kcp" and "importance: kcp;" in report.table()


def test_criterion_error_hint_only_when_the_callers_code_failed():
    """How prune() calls loss_fn / step_fn is appended when the user's code (or torch inside
    it) failed, not to the plugin's own ValueErrors, which say what to change (in full)."""
    model, x = ResBlockNet().eval(), torch.randn(4, 3, 16, 16)
    hint = "prune() calls loss_fn(model) -> loss"
    with pytest.raises(CriterionError) as own:  # cdc's check of the labels
        kcp_plugin.prune(model, x, "cdc", pruning_ratio=0.5, progress=False,
                         data=[(x, torch.rand(4))])
    assert hint not in str(own.value)
    assert str(own.value).endswith("got floating-point targets of shape (4,)")
    with pytest.raises(CriterionError) as own:  # a long one of the default step, not cut
        kcp_plugin.prune(model, x, "fisher", pruning_ratio=0.5, progress=False, data=[x])
    assert hint not in str(own.value) and "..." not in str(own.value)
    assert str(own.value).endswith("or step_fn=lambda model, batch: <loss>")
    # torch's ValueError inside the user's loss_fn (batch sizes differ): the hint helps there
    with pytest.raises(CriterionError, match="ValueError: Expected input batch_size") as theirs:
        kcp_plugin.prune(model, x, "taylor", pruning_ratio=0.5, progress=False,
                         loss_fn=lambda m: nn.functional.cross_entropy(m(x), torch.tensor([1])))
    assert hint in str(theirs.value)
