"""The criteria registry: names, errors, registration."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch_pruning as tp
from conftest import ResBlockNet, TinySeg

import kcp_plugin
from kcp_plugin import get_importance, list_importances, register_importance
from kcp_plugin.registry import _REGISTRY


def test_builtin_names_are_registered():
    names = set(list_importances())
    assert {"kcp", "l1", "l2", "fpgm", "taylor", "hessian", "bn", "lamp", "random"} <= names
    for name in names:
        assert isinstance(get_importance(name), tp.importance.Importance)
    assert list_importances("kcp*") == ["kcp", "kcp_kmeans", "kcp_mean", "kcp_representative"]


def test_builtins_map_to_the_right_torch_pruning_classes():
    assert get_importance("l1").p == 1 and get_importance("l2").p == 2
    assert isinstance(get_importance("fpgm"), tp.importance.FPGMImportance)
    assert isinstance(get_importance("lamp"), tp.importance.LAMPImportance)
    assert isinstance(get_importance("bn"), tp.importance.BNScaleImportance)
    assert get_importance("kcp_mean").centre == "mean" == get_importance("kcp").centre
    assert get_importance("kcp_representative").centre == "representative"
    assert kcp_plugin.importance_info("taylor").requires_grad
    assert not kcp_plugin.importance_info("kcp").requires_grad


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown importance 'fpgn'; close matches: fpgm\. "
                                         r"Valid names: .*bn, .*fpgm"):
        get_importance("fpgn")


def test_bad_keyword_names_the_accepted_ones():
    with pytest.raises(ValueError, match="accepted arguments: .*centre"):
        get_importance("kcp", center="mean")
    # a typo gets the close match, as an unknown criterion name does; a stranger gets none
    with pytest.raises(ValueError, match=r"does not accept tset \(did you mean test\?\); "):
        get_importance("cdc", tset="ttest")
    with pytest.raises(ValueError, match=r"does not accept foo; accepted arguments"):
        get_importance("l2", foo=1)


def test_register_a_new_criterion_and_use_it_everywhere():
    @register_importance("test_first_channel", summary="keeps channel 0")
    class FirstChannel(tp.importance.Importance):
        def __call__(self, group):
            scores = torch.zeros(len(group[0].idxs))
            scores[0] = 1.0
            return scores

    try:
        assert "test_first_channel" in list_importances()
        with pytest.raises(ValueError, match="already registered"):
            register_importance("test_first_channel")(FirstChannel)
        from conftest import ResBlockNet

        model = ResBlockNet()
        kcp_plugin.prune(model, torch.randn(1, 3, 16, 16), "test_first_channel",
                         pruning_ratio=0.5, progress=False)
        assert model.stem[0].out_channels == 8
    finally:
        _REGISTRY.pop("test_first_channel", None)


def test_random_is_seeded():
    from conftest import ResBlockNet

    model = ResBlockNet()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = next(iter(graph.get_all_groups()))
    assert torch.equal(get_importance("random", seed=3)(group),
                       get_importance("random", seed=3)(group))


def test_import_needs_only_torch_and_torch_pruning():
    # Hide every optional library (as if not installed), then import and use the core API.
    code = (
        "import sys, importlib.abc\n"
        "HIDDEN = {'timm', 'nni', 'mmengine', 'mmseg', 'mmcv', 'torchvision', 'matplotlib',"
        " 'sklearn', 'tqdm'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN:\n"
        "            raise ImportError('hidden: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, kcp_plugin\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),"
        " torch.nn.Conv2d(8, 4, 3))\n"
        "r = kcp_plugin.prune(m, torch.randn(1, 3, 8, 8), 'kcp', pruning_ratio=0.5)\n"
        "print(m[0].out_channels, sorted(h for h in HIDDEN if h in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4 []"


def test_fpgm_matches_upstream_and_handles_grouped_convs():
    """Same scores as torch-pruning's FPGM where it works; grouped convs no longer crash."""
    torch.manual_seed(0)
    net = ResBlockNet()
    x = torch.randn(1, 3, 16, 16)
    graph = kcp_plugin.graph.build_graph(net, x)
    ours, upstream = get_importance("fpgm"), tp.importance.FPGMImportance()
    groups = list(graph.get_all_groups(root_module_types=[torch.nn.Conv2d, torch.nn.Linear]))
    assert groups
    for group in groups:
        a, b = ours(group), upstream(group)
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    seg = TinySeg(4, 64)  # has a grouped (groups=4) conv
    # upstream FPGM raises scoring the grouped conv's group: the safety net keeps that group
    # (named, with upstream's error) and prunes the rest
    with pytest.warns(UserWarning, match="fails scoring its channels: RuntimeError"):
        report = kcp_plugin.prune(copy.deepcopy(seg), torch.randn(1, 3, 32, 32),
                                  tp.importance.FPGMImportance(), pruning_ratio=0.5)
    assert report.auto_protected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ours scores it: nothing kept
        report = kcp_plugin.prune(seg, torch.randn(1, 3, 32, 32), "fpgm", pruning_ratio=0.5)
    assert not report.auto_protected
    assert seg(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def test_criterion_arguments_feed_each_criterion_what_its_info_says():
    """One function turns (criterion, batches, loss) into prune's arguments, for every host."""
    calls = []

    def loss(model, batch, reduction):
        calls.append((batch, reduction))
        return torch.ones(2) if reduction == "none" else torch.tensor(1.0)

    info = kcp_plugin.importance_info
    assert kcp_plugin.criterion_arguments(info("kcp"), loss, batch="b", batches=["c"]) == {}
    assert info("hessian").per_sample_loss and not info("taylor").per_sample_loss
    taylor = kcp_plugin.criterion_arguments(info("taylor"), loss, batch="b")
    hessian = kcp_plugin.criterion_arguments(info("hessian"), loss, batch=lambda: "latest")
    assert set(taylor) == set(hessian) == {"loss_fn"}
    taylor["loss_fn"]("model")
    hessian["loss_fn"]("model")
    assert calls == [("b", "mean"), ("latest", "none")]
    fisher = kcp_plugin.criterion_arguments(info("fisher"), loss, batches=["c"], data_steps=3)
    assert fisher["data"] == ["c"] and fisher["data_steps"] == 3
    fisher["step_fn"]("model", "c")
    assert calls[-1] == ("c", "sum")  # summed: each sample's gradient is its own loss's
    with pytest.raises(ValueError, match="reads gradients"):
        kcp_plugin.criterion_arguments(info("taylor"), loss, batches=["c"])
    with pytest.raises(ValueError, match="collects statistics"):
        kcp_plugin.criterion_arguments(info("fisher"), loss, batch="b")
