"""NNI integration: coupled masks, scheduled / data-driven pruning, speedup, experiment search."""

from __future__ import annotations

import copy
import http.server
import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import nni
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import ResBlockNet
from fake_clock import CostClock
from nni.compression import TorchEvaluator
from nni.compression.base.compressor import Pruner as NNIPruner
from nni.compression.pruning import AGPPruner, L1NormPruner, LinearPruner

import kcp_plugin
from kcp_plugin.bench import nni_search as search
from kcp_plugin.integrations import nni as knni
from kcp_plugin.integrations.nni.groups import masked_channels
from kcp_plugin.models import build_model, example_inputs

RESIDUAL = ["stem.0", "stem.1", "b1.3", "b1.4", "b2.3", "b2.4"]  # one coupled channel group
CONV = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]


def _randomize_bn(model: nn.Module, zero_shift: bool = False) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a masked channel is not accidentally zero."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            if zero_shift:  # BN(0) == 0: removing a masked conv channel is exact
                m.running_mean.zero_()
                m.bias.data.zero_()
            else:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


def _net(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn(ResBlockNet(**kwargs).eval())


def _masked(model: nn.Module, masks: dict, name: str) -> set[int]:
    return masked_channels(dict(model.named_modules())[name], masks[name])


def _assert_untouched(model: nn.Module, state: dict, params: list) -> None:
    assert list(model.parameters()) == params
    assert not any("_nni_wrapper" in m._modules for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _snapshot(model: nn.Module) -> tuple[dict, list]:
    return {k: v.clone() for k, v in model.state_dict().items()}, list(model.parameters())


def _batches(n: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, size, size, generator=gen), torch.randint(0, 5, (8,), generator=gen))
            for _ in range(n)]


# ---------------------------------------------------------------------------- config_list
@pytest.mark.parametrize("legacy,replacement", [
    ({"op_types": ["Conv2d"], "total_sparsity": 0.5}, "global_group_id"),
    ({"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}, "sparse_ratio"),
    ({"op_types": ["Conv2d"], "sparsity": 0.5}, "sparse_ratio"),
    ({"op_partial_names": ["b1"], "sparse_ratio": 0.5}, "op_names_re"),
    ({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "max_sparsity_per_layer": 0.8},
     "max_sparse_ratio"),
])
def test_legacy_config_keys_give_a_clear_error_before_wrapping(legacy, replacement):
    model = _net()
    state, params = _snapshot(model)
    with pytest.raises(ValueError, match="legacy NNI 2.x key") as info:
        knni.KCPPruner(model, [legacy], example_inputs=torch.randn(1, 3, 8, 8))
    assert replacement in str(info.value)
    _assert_untouched(model, state, params)


@pytest.mark.parametrize("entry,message", [
    ({"op_types": ["Conv2d"], "sparse_threshold": 0.1}, "not supported"),
    ({"op_types": ["Conv2d"], "sparse_ratio": 1.5}, r"\[0, 1\)"),
    ({"sparse_ratio": 0.5}, "selects no layer"),
    ({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "speed": 1}, "unknown key 'speed'"),
    ({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": [1, 3]}, "whole output"),
])
def test_invalid_config_entries_are_named(entry, message):
    with pytest.raises(ValueError, match=message):
        knni.validate_config_list([entry])


def test_missing_example_inputs_and_unknown_criterion_are_clear():
    with pytest.raises(ValueError, match="example_inputs"):
        knni.KCPPruner(_net(), CONV)
    with pytest.raises(ValueError, match="Valid names"):
        knni.KCPPluginPruner(_net(), CONV, "kcpp", example_inputs=torch.randn(1, 3, 8, 8))


# ---------------------------------------------------------------------------- pruner classes
def test_every_registered_criterion_has_an_nni_pruner_class():
    classes = knni.list_pruners()
    assert set(classes) == set(kcp_plugin.list_importances())
    assert classes["kcp"] == "KCPPruner"
    for name, cls_name in classes.items():
        cls = getattr(knni, cls_name)
        assert issubclass(cls, knni.KCPPluginPruner) and cls.importance_name == name
        assert issubclass(cls, NNIPruner)
    # a generic pruner given the name and the generated class choose the same channels
    x = torch.randn(2, 3, 16, 16)
    _, a = knni.KCPPluginPruner(_net(), CONV, "l2", example_inputs=x).compress()
    _, b = knni.pruner_class("l2")(_net(), CONV, example_inputs=x).compress()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k]["weight"], b[k]["weight"]) for k in a)


@pytest.mark.parametrize("criterion", kcp_plugin.list_importances())
def test_every_criterion_prunes_coupled_groups_through_its_class(criterion):
    info = kcp_plugin.importance_info(criterion)
    batches = _batches(3)
    x, y = batches[0]
    kwargs = {}
    if info.requires_data:
        kwargs["data"] = batches
    if info.requires_grad:
        reduction = "none" if criterion == "hessian" else "mean"
        kwargs["loss_fn"] = lambda m: F.cross_entropy(m(x), y, reduction=reduction)
    model = _net()
    _, masks = knni.pruner_class(criterion)(model, CONV, example_inputs=x, **kwargs).compress()
    residual = [_masked(model, masks, n) for n in RESIDUAL]
    assert all(s == residual[0] for s in residual) and len(residual[0]) == 8
    assert len(_masked(model, masks, "b2.0")) == len(_masked(model, masks, "b2.1")) == 16


def test_masks_of_a_residual_net_are_coupled_unlike_nni_l1():
    x = torch.randn(2, 3, 16, 16)
    model = _net()
    pruner = knni.KCPPruner(model, CONV, example_inputs=x)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    # BatchNorms of pruned groups are wrapped and masked too; the output layer is not pruned
    assert {"stem.1", "b1.1", "b1.4", "b2.1", "b2.4"} <= set(masks)
    assert "fc" not in masks
    residual = [_masked(model, masks, n) for n in RESIDUAL]
    assert all(s == residual[0] for s in residual) and len(residual[0]) == 8
    assert _masked(model, masks, "b1.0") == _masked(model, masks, "b1.1")
    assert len(_masked(model, masks, "b2.0")) == 16  # int(32 * 0.5)
    # NNI's L1NormPruner masks each residual conv on its own: the channel sets differ
    other = _net()
    _, l1_masks = L1NormPruner(other, CONV).compress()
    sets = [_masked(other, l1_masks, n) for n in ("stem.0", "b1.3", "b2.3")]
    assert not sets[0] == sets[1] == sets[2]


def test_excluded_layer_protects_its_group_and_global_ranking_spreads_the_ratio():
    x = torch.randn(2, 3, 16, 16)
    model = _net()
    config = [{"op_types": ["Conv2d"], "exclude_op_names": ["b1.3"], "sparse_ratio": 0.5}]
    _, masks = knni.KCPPruner(model, config, example_inputs=x).compress()
    assert all(not _masked(model, masks, n) for n in ("stem.0", "b2.3"))
    assert len(_masked(model, masks, "b1.0")) == 8
    model = _net()
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "global_group_id": 0}]
    _, masks = knni.KCPPruner(model, config, example_inputs=x).compress()
    counts = [len(_masked(model, masks, n)) for n in ("stem.0", "b1.0", "b2.0")]
    assert sum(counts) == 32  # half of the 16 + 16 + 32 channels of the three groups
    assert counts != [8, 8, 16]  # ranked across groups, not per group


# ---------------------------------------------------------------------------- scheduled pruning
def _evaluator(model: nn.Module, batches: list) -> TorchEvaluator:
    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                      max_epochs=None):
        model.train()
        for step, batch in enumerate(itertools.cycle(batches)):
            if step >= (max_steps or len(batches)):
                break
            optimizers.zero_grad()
            training_step(batch, model).backward()
            optimizers.step()

    def training_step(batch, model):
        return F.cross_entropy(model(batch[0]), batch[1])

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(training_func, optimizer, training_step,
                          dummy_input=batches[0][0][:2])


@pytest.mark.parametrize("scheduler", [AGPPruner, LinearPruner])
def test_our_pruner_inside_nni_scheduled_pruners(scheduler):
    batches = _batches()
    model = ResBlockNet()
    pruner = knni.KCPPruner(model, CONV, example_inputs=batches[0][0][:2])
    selections = []
    update = pruner.update_masks

    def record(masks):
        selections.append({n: _masked(model, masks, n) for n in ("stem.0", "b2.0")})
        update(masks)

    pruner.update_masks = record
    scheduled = scheduler(pruner, interval_steps=2, total_times=3,
                          evaluator=_evaluator(model, batches))
    _, masks = scheduled.compress(max_steps=6, max_epochs=None)
    scheduled.unwrap_model()
    assert len(selections) == 3
    sizes = [len(s["stem.0"]) for s in selections]
    assert sizes == sorted(sizes) and sizes[-1] == 8 and sizes[0] < 8
    for before, after in zip(selections, selections[1:]):  # pruned channels stay pruned
        assert before["stem.0"] <= after["stem.0"] and before["b2.0"] <= after["b2.0"]
    residual = [_masked(model, masks, n) for n in RESIDUAL]
    assert all(s == residual[0] for s in residual)


@pytest.mark.parametrize("criterion", ["fisher", "cdc", "taylor"])
def test_data_and_gradient_criteria_collect_through_an_nni_evaluator(criterion):
    batches = _batches()
    model = ResBlockNet()
    evaluator = _evaluator(model, batches)
    pruner = knni.pruner_class(criterion)(model, CONV, evaluator, training_steps=3)
    with pytest.raises(ValueError, match="training_steps|evaluator"):
        knni.pruner_class(criterion)(ResBlockNet(), CONV,
                                     example_inputs=batches[0][0]).compress()
    before = model.b1[0].weight.detach().clone()
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert pruner.generated == 1
    assert not torch.equal(model.b1[0].weight, before)  # the evaluator trained the model
    if criterion != "taylor":
        assert pruner.importance.samples == 3  # statistics of every training step
    residual = [_masked(model, masks, n) for n in RESIDUAL]
    assert all(s == residual[0] for s in residual) and len(residual[0]) == 8
    assert len(_masked(model, masks, "b2.0")) == 16


def test_data_driven_criterion_from_batches_without_an_evaluator():
    batches = _batches()
    model = _net()
    pruner = knni.KCPPluginPruner(model, CONV, "fisher", example_inputs=batches[0][0],
                                  data=batches)
    _, masks = pruner.compress()
    assert len(_masked(model, masks, "stem.0")) == 8


# ---------------------------------------------------------------------------- speedup
def _speedup_case(name: str):
    if name == "resblock":
        return _net(width=24), torch.randn(2, 3, 16, 16), None
    if name == "deeplabv3_lite":
        torch.manual_seed(0)
        return (_randomize_bn(build_model("deeplabv3_lite", width=8).eval()),
                example_inputs("deeplabv3_lite", 2, size=32), None)
    if name == "stereo_lite":
        torch.manual_seed(0)
        return (_randomize_bn(build_model("stereo_lite", width=8, max_disp=8).eval()),
                example_inputs("stereo_lite", 1, size=(32, 64)), lambda m, x: m(*x))
    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.resnet18().eval()), torch.randn(2, 3, 64, 64), None


@pytest.mark.parametrize("case", ["resblock", "deeplabv3_lite", "stereo_lite",
                                  "torchvision_resnet18"])
def test_speedup_output_equals_the_masked_model(case, tmp_path):
    model, x, fwd = _speedup_case(case)
    run = fwd or (lambda m, inp: m(inp))
    config = [{"op_types": ["Conv2d", "Conv3d", "ConvTranspose2d", "Linear"],
               "sparse_ratio": 0.4}]
    pruner = knni.KCPPruner(model, config, example_inputs=x, forward_fn=fwd)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    masked = copy.deepcopy(model)
    knni.apply_masks(masked, masks)
    report = knni.speedup(model, masks, x, forward_fn=fwd)
    assert not report.conflicts and not report.kept_masked
    assert 0.2 < report.macs_ratio < 0.6
    assert report.macs_after == kcp_plugin.count_macs_params(model, x, fwd)[0]
    with torch.no_grad():
        expected, got = run(masked, x), run(model, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    if case == "resblock":  # the plan replays: save_pruned / load_pruned work after speedup
        kcp_plugin.save_pruned(model, tmp_path / "pruned.pt")
        loaded = kcp_plugin.load_pruned(lambda: ResBlockNet(width=24), tmp_path / "pruned.pt", x)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), got)


def test_speedup_of_nni_l1_masks_keeps_channels_coupled_layers_disagree_on():
    x = torch.randn(2, 3, 16, 16)
    model = _net(seed=1)
    _randomize_bn(model, zero_shift=True)  # unmasked BNs map a masked channel to 0
    pruner = L1NormPruner(model, CONV)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    masked = copy.deepcopy(model)
    knni.apply_masks(masked, masks)
    stem_masked = _masked(model, masks, "stem.0")
    residual_every = set.intersection(*[_masked(model, masks, n) for n in ("stem.0", "b1.3",
                                                                          "b2.3")])
    report = knni.speedup(model, masks, x)
    # only the residual group (stem.0 / b1.3 / b2.3) disagrees; inner groups have one mask
    assert len(report.conflicts) == 1 and set(report.conflicts) <= {"stem.0", "b1.3", "b2.3"}
    assert model.b1[0].out_channels == 8 and model.b2[0].out_channels == 16
    assert model.stem[0].out_channels == 16 - len(residual_every) > 16 - len(stem_masked)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-4, atol=1e-6)
    any_model = _net(seed=1)
    _randomize_bn(any_model, zero_shift=True)
    knni.speedup(any_model, masks, x, policy="any")
    assert any_model.stem[0].out_channels < model.stem[0].out_channels


def test_speedup_validates_and_is_atomic(monkeypatch):
    x = torch.randn(2, 3, 16, 16)
    model = _net()
    pruner = knni.KCPPruner(model, CONV, example_inputs=x)
    _, masks = pruner.compress()
    with pytest.raises(ValueError, match="unwrap_model"):
        knni.speedup(model, masks, x)
    pruner.unwrap_model()
    state, params = _snapshot(model)
    bad = {**masks, "b1.0": {"weight": torch.ones(3, 3)}}
    with pytest.raises(ValueError, match="shape"):
        knni.speedup(model, bad, x)
    with pytest.raises(ValueError, match="does not have: 'b1.O'; close matches: b1"):
        knni.speedup(model, {"b1.O": masks["b1.0"]}, x)
    with pytest.raises(ValueError, match="policy"):
        knni.speedup(model, masks, x, policy="union")
    _assert_untouched(model, state, params)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    # the package attribute "speedup" is the function; patch inside its module
    monkeypatch.setattr(sys.modules["kcp_plugin.integrations.nni.speedup"], "extend_plan", fail)
    with pytest.raises(RuntimeError, match="injected"):
        knni.speedup(model, masks, x)
    _assert_untouched(model, state, params)


def test_speedup_does_not_import_nni():
    code = ("import sys, torch, kcp_plugin.integrations.nni as k; "
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)); "
            "w = torch.ones(4, 3, 3, 3); w[0] = 0; "
            "r = k.speedup(m, {'0': {'weight': w}}, torch.randn(1, 3, 8, 8)); "
            "assert m[0].out_channels == 3 and 'nni' not in sys.modules, sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---------------------------------------------------------------------------- experiment search
def test_search_space_is_checked_before_any_experiment():
    with pytest.raises(ValueError, match="stages: stem"):
        search.check_search_space({"ratio_encoder": {"_type": "uniform", "_value": [0, .5]}},
                                  "segmentation")
    with pytest.raises(ValueError, match="not both"):
        search.check_search_space({"target_macs": {"_type": "uniform", "_value": [.3, .5]},
                                   "ratio_stem": {"_type": "uniform", "_value": [0, .5]}},
                                  "segmentation")
    with pytest.raises(ValueError, match="Valid names"):
        search.check_search_space({"criterion": {"_type": "choice", "_value": ["kcpp"]}},
                                  "segmentation")
    with pytest.raises(ValueError, match="stereo task"):
        search.check_search_space({"criterion": {"_type": "choice", "_value": ["cdc"]}},
                                  "stereo")
    with pytest.raises(ValueError, match=r"'target_latency': values must be in \(0, 1\]"):
        search.check_search_space({"target_latency": {"_type": "uniform", "_value": [.3, 1.5]}},
                                  "segmentation")
    with pytest.raises(ValueError, match="target_latency or per-stage ratio_<stage> keys"):
        search.check_search_space({"target_latency": {"_type": "uniform", "_value": [.3, .5]},
                                   "ratio_stem": {"_type": "uniform", "_value": [0, .5]}},
                                  "segmentation")
    for path in ("configs/nni/search_space.json", "configs/nni/search_space_stages.json",
                 "configs/nni/search_space_latency.json"):
        with open(kcp_plugin_root() / path) as f:
            search.check_search_space(json.load(f), "segmentation")


def kcp_plugin_root():
    return Path(__file__).resolve().parents[1]


def test_tuner_that_does_not_connect_gives_a_clear_error(tmp_path):
    payload = {"status": "ERROR", "errors": [
        "tuner_command_channel: Tuner did not connect in 10 seconds. Please check tuner "
        "(dispatcher) log."]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(search.TunerConnectionError, match="did not connect.*dispatcher.log"):
            search._check_status(server.server_address[1], tmp_path)
        payload["errors"] = ["trial command failed"]
        with pytest.raises(RuntimeError, match="trial command failed"):
            search._check_status(server.server_address[1], tmp_path)
    finally:
        server.shutdown()


def test_two_trial_experiment_runs_end_to_end(tmp_path):
    space = {"criterion": {"_type": "choice", "_value": ["l2", "kcp"]},
             "ratio_layer3": {"_type": "uniform", "_value": [0.2, 0.6]},
             "ratio_layer4": {"_type": "uniform", "_value": [0.2, 0.6]}}
    settings = search.SearchSettings(task="segmentation", n_train=16, n_val=8, batch_size=8,
                                     finetune_steps=3, report_every=1, threads=1)
    lines: list[str] = []
    rows, text = search.run_search(
        space, settings, tmp_path, dense_steps=2, config_path=None, max_trials=2,
        concurrency=2, timeout_s=600, progress=False, log=lines.append)
    assert len(rows) == 2 and all(r["status"] == "SUCCEEDED" for r in rows), rows
    # what the user saw: dense progress (no bar: progress=False), the dense model against
    # background-only (2 steps learn nothing: warned), one line per finished trial
    steps = [line for line in lines if line.startswith("dense segmentation: step ")]
    assert len(steps) == 2 and "step 1/2 (50 %)" in steps[0] and "step 2/2 (100 %)" in steps[1]
    assert any(line.startswith("dense model: miou") and "predicting background everywhere"
               in line for line in lines)
    assert any(line.startswith("warning: the dense model") for line in lines)
    trial_lines = [line for line in lines if line.startswith("[trial ")]
    assert len(trial_lines) == 2 and {line[:12] for line in trial_lines} == {"[trial 1/2] ",
                                                                             "[trial 2/2] "}
    for row in rows:
        (line,) = [t for t in trial_lines if f" {row['trial']} SUCCEEDED" in t]
        assert f"No. {row['number']} " in line
        assert f"miou {row['final']['default']:.2f}" in line
        assert f"MACs kept {row['final']['macs_ratio']:.3f}" in line
        assert f"criterion={row['params']['criterion']}" in line
    assert sorted(r["number"] for r in rows) == [0, 1]
    for row in rows:
        final = row["final"]
        assert row["params"]["criterion"] in ("l2", "kcp")
        assert 0.2 <= row["params"]["ratio_layer3"] <= 0.6
        assert 0.0 < final["macs_ratio"] < 1.0 and final["metric"] == "miou"
        assert 0.0 <= final["default"] <= 100.0
        assert len(row["intermediate"]) == 2  # steps 1 and 2 of 3
    assert (tmp_path / "accuracy_vs_macs.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["trials"]) == 2 and saved["dense"]["metric"] == "miou"
    assert "Accuracy-vs-MACs front" in text and all(r["trial"] in text for r in rows)
    front = search.pareto_front(rows)
    assert 1 <= len(front) <= 2


def test_pareto_front_follows_the_metric_direction():
    def row(name, value, macs):
        return {"trial": name, "params": {}, "final": {"default": value, "macs_ratio": macs}}

    rows = [row("a", 50.0, 0.4), row("b", 45.0, 0.3), row("c", 40.0, 0.5), row("d", 44.0, 0.6)]
    assert [r["trial"] for r in search.pareto_front(rows)] == ["b", "a"]
    assert [r["trial"] for r in search.pareto_front(rows, higher_is_better=False)] == ["b", "c"]


# ---------------------------------------------------------------------------- search progress
def _row(status="SUCCEEDED", **kw):
    row = {"trial": "Ab3xY", "number": 2, "status": status, "log": "file://host/trial/Ab3xY",
           "params": {"criterion": "kcp", "target_macs": 0.3, "finetune_lr": 0.00123},
           "final": {"default": 24.444, "macs_ratio": 0.2891, "after_prune": 15.49,
                     "dense": 32.33, "metric": "miou"},
           "intermediate": [{"default": 19.0, "macs_ratio": 0.2891, "step": 20}],
           "duration_s": 34.2}
    return {**row, **kw}


def test_trial_line_has_number_id_status_metric_macs_and_parameters():
    line = search.format_trial(_row(), "miou", done=3, total=8)
    assert line == ("[trial 3/8] No. 2 Ab3xY SUCCEEDED  miou 24.44 (dense 32.33)  MACs kept "
                    "0.289  after prune 15.49  34 s  criterion=kcp, target_macs=0.3, "
                    "finetune_lr=0.00123")
    failed = search.format_trial(_row("FAILED", final=None, intermediate=[]), "miou", done=1)
    assert failed.startswith("[trial 1] No. 2 Ab3xY FAILED  34 s  log file://host/trial/Ab3xY")
    assert "miou" not in failed and failed.endswith("criterion=kcp, target_macs=0.3, "
                                                    "finetune_lr=0.00123")
    stopped = search.format_trial(_row("EARLY_STOPPED", final=None), "miou")
    assert "EARLY_STOPPED  miou 19.00 (last intermediate, step 20)  MACs kept 0.289" in stopped


def test_each_finished_trial_is_reported_once_when_its_final_result_is_there(monkeypatch,
                                                                              tmp_path):
    """launch_experiment's polling against a scripted NNI: a succeeded trial whose final
    result has not arrived yet waits for it; a failed one is reported at once."""
    import types

    import nni.experiment

    def job(jid, number, status):
        hp = [types.SimpleNamespace(parameters={"criterion": "l2", "from": "listing"})]
        return types.SimpleNamespace(trialJobId=jid, sequenceId=number, status=status,
                                     hyperParameters=hp, logPath=f"/log/{jid}",
                                     startTime=1000, endTime=4000 if status != "RUNNING" else -1)

    final = types.SimpleNamespace(type="FINAL", data=json.dumps(
        {"default": 30.0, "macs_ratio": 0.5, "params": {"criterion": "kcp"}}))
    polls = [  # (experiment status, jobs, metrics) per poll
        ("RUNNING", [job("A", 0, "RUNNING"), job("B", 1, "RUNNING")], {}),
        ("RUNNING", [job("A", 0, "SUCCEEDED"), job("B", 1, "FAILED")], {}),
        ("DONE", [job("A", 0, "SUCCEEDED"), job("B", 1, "FAILED")], {"A": [final]}),
    ]
    state = {"poll": -1}

    class FakeExperiment:
        id = "fake"

        def __init__(self, config):
            self.config = config

        def start(self, port):
            pass

        def stop(self):
            pass

        def list_trial_jobs(self):
            return polls[state["poll"]][1]

        def get_job_metrics(self):
            return polls[state["poll"]][2]

    def check_status(port, log_dir):
        state["poll"] = min(state["poll"] + 1, len(polls) - 1)
        return polls[state["poll"]][0]

    monkeypatch.setattr(nni.experiment, "Experiment", FakeExperiment)
    monkeypatch.setattr(search, "_check_status", check_status)
    monkeypatch.setattr(search.time, "sleep", lambda s: None)
    seen = []
    rows = search.launch_experiment(
        {"criterion": {"_type": "choice", "_value": ["kcp"]}}, search.SearchSettings(),
        tmp_path, max_trials=2, port=1, progress=False,
        on_trial=lambda row, done, limit: seen.append((row["trial"], done, limit)))
    assert seen == [("B", 1, 2), ("A", 2, 2)]  # B failed first; A waited for its result
    assert [r["number"] for r in rows] == [0, 1]
    assert rows[0]["params"] == {"criterion": "kcp"} and rows[0]["final"]["default"] == 30.0
    assert rows[0]["duration_s"] == 3.0 and rows[1]["final"] is None


def test_constant_baseline_is_the_background_share_over_the_classes_present():
    from kcp_plugin.bench import get_task

    train_ds, val_ds = get_task("segmentation").splits(0, 8, 4)
    base = search.constant_baseline("segmentation", train_ds, val_ds)
    labels = val_ds.tensors[1]
    present = int((torch.bincount(labels.flatten(), minlength=5) > 0).sum())
    assert base["label"] == 0
    assert base["value"] == pytest.approx(100 * float((labels == 0).float().mean()) / present)
    assert search.constant_baseline("stereo", train_ds, val_ds) is None


def test_quick_settings_train_a_dense_model_that_beats_background_only(tmp_path):
    """The quick search's data and budget (a third of its dense steps, half its images, to
    stay fast) learn more than background; the earlier quick settings (32 images, 20 steps)
    did not, and check_dense says so."""
    with pytest.raises(ValueError, match=r"n_train \(8\) must be at least batch_size \(16\)"):
        search.SearchSettings(n_train=8)  # would train forever on no batch
    quick = search.quick_settings(search.SearchSettings(n_train=17, criterion="l2"))
    assert quick.threads == 1 and quick.n_train == search.QUICK_SETTINGS["n_train"]
    assert quick.criterion == "l2"  # what the quick search does not set is kept
    quick.n_train, quick.n_val = 512, 32
    meta = search.train_dense(quick, 200, 3e-3, tmp_path / "dense.pt", progress=False)
    assert meta["value"] > meta["baseline"]["value"] + 2.0, meta
    assert search.check_dense(meta) is None
    old = search.SearchSettings(n_train=32, n_val=16, batch_size=8, threads=1)
    meta = search.train_dense(old, 20, 3e-3, tmp_path / "old.pt", progress=False)
    assert meta["value"] == pytest.approx(meta["baseline"]["value"], abs=0.5), meta
    assert "predicting background everywhere" in search.check_dense(meta)


def test_quick_flag_sets_the_quick_search_and_prints_progress(monkeypatch, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tool_nni_search",
                                                  kcp_plugin_root() / "tools" / "nni_search.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    calls = []

    def fake_run_search(space, settings, out, **kwargs):
        calls.append((space, settings, kwargs))
        kwargs["log"]("a progress line")
        return [{"final": {"default": 1.0}}], "summary"

    monkeypatch.setattr(tool, "run_search", fake_run_search)
    assert tool.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "a progress line\n" in capsys.readouterr().out
    space, settings, kwargs = calls[-1]
    assert "finetune_steps" not in space and settings.finetune_steps == 60
    assert (settings.n_train, settings.threads) == (1024, 1)
    assert (kwargs["dense_steps"], kwargs["max_trials"], kwargs["concurrency"]) == (
        search.QUICK_DENSE_STEPS, search.QUICK_TRIALS, search.QUICK_CONCURRENCY)
    assert tool.main(["--quick", "--dense-steps", "50", "--threads", "2", "--out",
                      str(tmp_path)]) == 0
    assert calls[-1][2]["dense_steps"] == 50 and calls[-1][1].threads == 2
    assert tool.main(["--out", str(tmp_path)]) == 0
    assert calls[-1][2]["dense_steps"] == 300 and calls[-1][1].n_train == 256
    assert tool.main(["--quick", "--n-train", "4", "--out", str(tmp_path)]) == 0  # replaced
    count = len(calls)
    assert tool.main(["--n-train", "4", "--out", str(tmp_path)]) == 2  # not a single batch
    assert len(calls) == count and "n_train (4) must be at least" in capsys.readouterr().err


# ---------------------------------------------------------------------------- latency search
CLOCK_SETTING = "torch (stand-in clock), fp32, batch 1, 1 thread"


@pytest.mark.parametrize("latency,message", [
    ({"backend": "tensorrt"}, "unknown latency backend 'tensorrt'; valid: torch, onnxruntime, "
                              "cuda"),
    ("torhc", "unknown latency backend 'torhc'; valid: torch, onnxruntime, cuda; close "
              "matches: torch"),
    ({"backnd": "torch"}, "unknown latency setting 'backnd'; valid: backend, device, dtype, "
                          "batch, .*; close matches: backend"),
    ({"backend": "onnxruntime", "dtype": "fp16"}, "cannot run dtype 'fp16'; valid: fp32"),
    ({"backend": "torch", "device": "cuda"}, "runs on the CPU; device 'cuda' is not valid"),
    ({"allocation": "knapsack"}, "unknown latency allocation 'knapsack'; valid: table, uniform"),
    ({"target": 1.5}, r"latency target must be a fraction of the dense latency in \(0, 1\]"),
    ({"threads": 0}, "threads must be an integer >= 1, got 0"),
    ({"timer": "my.clock"}, "unknown latency setting 'timer'"),
    (["torch"], "latency settings must be a mapping with keys among backend"),
])
def test_bad_latency_settings_are_named_with_the_valid_choices(latency, message):
    with pytest.raises(ValueError, match=message):
        search.SearchSettings(latency=latency)


def test_latency_problems_stop_the_search_before_anything_runs(monkeypatch, tmp_path):
    """A backend this machine lacks, or a latency target the settings cannot reach, fails in
    run_search before the dense model is trained or NNI starts (nothing written)."""
    def never(*args, **kwargs):
        raise AssertionError("ran before the latency settings were checked")

    monkeypatch.setattr(search, "train_dense", never)
    monkeypatch.setattr(search, "launch_experiment", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    macs = {"target_macs": {"_type": "uniform", "_value": [0.3, 0.6]}}
    latency = {"target_latency": {"_type": "uniform", "_value": [0.3, 0.6]}}
    out = tmp_path / "out"
    cases = [
        (macs, {"backend": "cuda", "dtype": "fp16"}, "'cuda' needs an NVIDIA GPU"),
        (latency, {"runs": 2}, "needs >= 3 timed passes per measurement, got runs=2"),
        ({**latency, **macs}, {"allocation": "uniform"},
         "MACs budget, which only the 'table' latency allocation takes"),
        ({"ratio_stem": {"_type": "uniform", "_value": [0.0, 0.5]}}, {"target": 0.5},
         "search it or ratio_<stage> keys, not both"),
    ]
    for space, options, message in cases:
        settings = search.SearchSettings(latency=options)
        with pytest.raises(ValueError, match=message):
            search.run_search(space, settings, out, config_path=None, progress=False)
    config = tmp_path / "bad.yml"
    config.write_text("trialConcurrency: 1\nlatency:\n  backend: torch\n  trheads: 1\n")
    with pytest.raises(ValueError, match="unknown latency setting 'trheads'.*close matches: "
                                         "threads"):
        search.run_search(macs, search.SearchSettings(), out, config_path=config,
                          progress=False)
    assert not out.exists()


@pytest.fixture
def tiny_search(tmp_path):
    """Settings of a tiny search and its (untrained) dense checkpoint."""
    settings = search.SearchSettings(n_train=16, n_val=8, batch_size=8, finetune_steps=2,
                                     report_every=1, threads=1)
    search.train_dense(settings, 0, 3e-3, tmp_path / "dense.pt", progress=False)
    settings.dense = str(tmp_path / "dense.pt")
    return settings


def test_trial_reports_the_latency_it_kept_on_the_backend(tiny_search, tmp_path):
    """Every trial times its pruned model against the dense one on the configured backend (here
    the deterministic stand-in clock) and reports it with its metrics, naming the setting."""
    from dataclasses import asdict

    from kcp_plugin.bench import get_task

    plain = search.run_trial({"criterion": "l2", "target_macs": 0.5}, tiny_search)
    assert not any(k.startswith("latency") for k in plain)  # no backend: nothing measured
    settings = copy.copy(tiny_search)
    settings.latency = {"backend": "torch", "runs": 3}
    (tmp_path / "settings.json").write_text(json.dumps(asdict(settings)))  # what trials read
    assert search.SearchSettings.load(tmp_path / "settings.json") == settings
    reports: list = []
    result = search.run_trial({"criterion": "l2", "target_macs": 0.5}, settings,
                              lambda kind, value: reports.append((kind, value)),
                              timer=CostClock())
    assert result["latency_setting"] == CLOCK_SETTING
    assert 0.0 < result["latency_ratio"] < 1.0 and "target_latency" not in result
    assert result["latency_ratio"] == pytest.approx(result["latency_ms"]
                                                    / result["dense_latency_ms"])
    assert result["latency_q1_ms"] <= result["latency_ms"] <= result["latency_q3_ms"]
    # the dense figure is the stand-in clock's cost of the dense model
    task = get_task("segmentation")
    dense = task.build(0)
    dense.load_state_dict(torch.load(settings.dense)["state_dict"])
    (stats,) = kcp_plugin.compare_latency([dense], task.example_inputs(),
                                          backend=kcp_plugin.Backend(timer=CostClock(), runs=3))
    assert result["dense_latency_ms"] == pytest.approx(stats.median_ms)
    intermediate = [v for kind, v in reports if kind == "intermediate"]
    assert intermediate and all(v["latency_ratio"] == result["latency_ratio"]
                                for v in intermediate)
    assert reports[-1] == ("final", result)
    again = search.run_trial({"criterion": "l2", "target_macs": 0.5}, settings,
                             timer=CostClock())
    assert again["latency_ratio"] == result["latency_ratio"]  # deterministic


@pytest.mark.parametrize("allocation", ["table", "uniform"])
def test_trial_prunes_to_a_latency_target(tiny_search, allocation):
    settings = copy.copy(tiny_search)
    settings.latency = {"backend": "torch", "runs": 3, "allocation": allocation}
    result = search.run_trial({"criterion": "l2", "target_latency": 0.4}, settings,
                              timer=CostClock())
    assert result["target_latency"] == 0.4 and result["latency_allocation"] == allocation
    assert result["latency_ratio"] == pytest.approx(0.4, abs=0.025)  # prune's tolerance
    assert result["macs_ratio"] < 0.6
    # a fixed target from the latency settings, when the search space has none
    settings.latency = {"runs": 3, "allocation": allocation, "target": 0.6}
    result = search.run_trial({"criterion": "l2"}, settings, timer=CostClock())
    assert result["target_latency"] == 0.6
    assert result["latency_ratio"] == pytest.approx(0.6, abs=0.025)
    with pytest.raises(ValueError, match="not both"):
        search.run_trial({"criterion": "l2", "ratio_stem": 0.3}, settings, timer=CostClock())


def _timed_row(name, value, macs, latency, criterion="kcp"):
    return {"trial": name, "number": 0, "status": "SUCCEEDED", "intermediate": [],
            "params": {"criterion": criterion},
            "final": {"default": value, "macs_ratio": macs, "after_prune": 10.0,
                      "latency_ratio": latency, "dense_latency_ms": 20.0 + latency,
                      "latency_ms": 20.0 * latency, "latency_setting": CLOCK_SETTING}}


def test_summary_writes_the_accuracy_vs_latency_front(tmp_path):
    rows = [_timed_row("a", 50.0, 0.4, 0.6), _timed_row("b", 45.0, 0.3, 0.7, "l2"),
            _timed_row("c", 48.0, 0.5, 0.45), _timed_row("d", 40.0, 0.6, 0.8)]
    assert [r["trial"] for r in search.pareto_front(rows)] == ["b", "a"]
    assert [r["trial"] for r in search.pareto_front(rows, cost="latency_ratio")] == ["c", "a"]
    text = search.summarize(rows, tmp_path, metric="miou",
                            dense={"value": 55.0, "macs": 2e7, "task": "segmentation"})
    assert f"on {CLOCK_SETTING}; the dense model: 20.65 ms (median over the " in text
    head, latency = text.split("## Accuracy-vs-latency front")
    assert latency.startswith(f" (2 trials; {CLOCK_SETTING})")
    assert latency.index("| c |") < latency.index("| a |") and "| b |" not in latency
    assert "| trial | miou | MACs kept | latency kept | after prune |" in head
    assert "| c | 48.00 | 0.500 | 0.450 | 10.00 |" in head
    for png in ("accuracy_vs_macs.png", "accuracy_vs_latency.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    plain = tmp_path
    for r in rows:
        for key in [k for k in r["final"] if k.startswith(("latency", "dense_latency"))]:
            del r["final"][key]
    text = search.summarize(rows, plain, metric="miou")
    assert "latency" not in text and not (plain / "accuracy_vs_latency.png").exists()
    line = search.format_trial(_row(final={**_row()["final"], "latency_ratio": 0.5123}), "miou")
    assert "MACs kept 0.289  latency kept 0.512  after prune 15.49" in line


def test_latency_trials_run_one_at_a_time_and_name_the_backend(monkeypatch, tmp_path):
    """The config's latency section fills the settings (the settings' own keys win); while
    latency is measured, trials run one at a time unless a concurrency is given (warned)."""
    calls = []
    meta = {"task": "segmentation", "metric": "miou", "value": 30.0, "macs": 2e7,
            "train_s": 0.1, "baseline": None}
    monkeypatch.setattr(search, "train_dense", lambda *args, **kwargs: meta)
    monkeypatch.setattr(search, "launch_experiment", lambda space, settings, out, **kwargs:
                        calls.append((settings, kwargs)) or [])
    config = tmp_path / "experiment.yml"
    config.write_text("trialConcurrency: 3\nlatency:\n  backend: torch\n  threads: 2\n"
                      "  runs: 5\n")
    space = {"target_macs": {"_type": "uniform", "_value": [0.3, 0.6]}}
    lines: list[str] = []
    settings = search.SearchSettings(latency={"threads": 1})
    search.run_search(space, settings, tmp_path / "a", config_path=config, progress=False,
                      log=lines.append)
    assert settings.latency == {"backend": "torch", "threads": 1, "runs": 5}  # updated
    used, kwargs = calls[-1]
    assert used.latency == {"backend": "torch", "threads": 1, "runs": 5}
    assert kwargs["concurrency"] == 1
    assert any("trialConcurrency 3 is overridden" in line for line in lines)
    (where,) = [line for line in lines if line.startswith("latency: every trial")]
    assert where.endswith("fp32, batch 1, 1 thread") and "torch (" in where
    lines.clear()
    search.run_search(space, search.SearchSettings(latency={"threads": 1}), tmp_path / "b",
                      config_path=config, concurrency=2, progress=False, log=lines.append)
    assert calls[-1][1]["concurrency"] == 2
    assert any(line.startswith("warning: 2 trials at a time, each measuring latency")
               for line in lines)
    lines.clear()
    target = {"target_latency": {"_type": "uniform", "_value": [0.3, 0.6]}}
    search.run_search(target, search.SearchSettings(), tmp_path / "c", progress=False,
                      log=lines.append)  # a latency target alone: the default backend
    assert calls[-1][1]["concurrency"] == 1
    assert any("each prunes to the target_latency it is given (allocation table)" in line
               for line in lines)
    lines.clear()
    search.run_search(space, search.SearchSettings(), tmp_path / "d", progress=False,
                      log=lines.append)
    assert calls[-1][1]["concurrency"] is None and not any("latency" in x for x in lines)


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tool_nni_search",
                                                  kcp_plugin_root() / "tools" / "nni_search.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_latency_flags_of_the_search_tool(monkeypatch, tmp_path, capsys):
    tool = _tool()
    calls = []

    def fake_run_search(space, settings, out, **kwargs):
        calls.append((space, settings, kwargs))
        return [{"final": {"default": 1.0}}], "summary"

    monkeypatch.setattr(tool, "run_search", fake_run_search)
    out = ["--out", str(tmp_path)]
    assert tool.main(["--latency-backend", "torch", "--latency-threads", "1",
                      "--target-latency", "0.5", *out]) == 0
    assert calls[-1][1].latency == {"backend": "torch", "threads": 1, "target": 0.5}
    assert calls[-1][2]["concurrency"] is None  # run_search makes it 1
    assert tool.main(["--quick", "--latency-backend", "onnxruntime", *out]) == 0
    assert calls[-1][2]["concurrency"] == 1 and calls[-1][1].latency == {
        "backend": "onnxruntime"}
    assert tool.main(["--quick", *out]) == 0
    assert calls[-1][2]["concurrency"] == search.QUICK_CONCURRENCY
    config = str(kcp_plugin_root() / "configs/nni/experiment_latency.yml")
    assert tool.main(["--config", config, "--latency-batch", "4", *out]) == 0
    assert calls[-1][1].latency == {"backend": "torch", "dtype": "fp32", "batch": 4,
                                    "threads": 1, "runs": 10, "allocation": "table"}
    count = len(calls)
    capsys.readouterr()
    assert tool.main(["--latency-backend", "tensorrt", *out]) == 2
    assert "unknown latency backend 'tensorrt'; valid: torch, onnxruntime, cuda" in \
        capsys.readouterr().err
    assert tool.main(["--latency-allocation", "greedy", *out]) == 2
    assert "valid: table, uniform" in capsys.readouterr().err
    assert len(calls) == count  # refused before the search
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "--latency-backend" in capsys.readouterr().out


def test_a_failed_trial_names_the_exception_that_ended_it(tmp_path):
    """An unreachable latency target fails its trial; the trial line and the summary say why
    (read from the trial's stderr) instead of only pointing at its log."""
    import types

    folder = tmp_path / "trials" / "Zx9"
    folder.mkdir(parents=True)
    (folder / "trial.stderr").write_text(
        "Traceback (most recent call last):\n  File \"a.py\", line 1, in f\n    g()\n"
        "ValueError: first\n\nDuring handling of the above exception, another exception "
        "occurred:\n\nTraceback (most recent call last):\n  File \"b.py\", line 2, in g\n"
        "    h()\nkcp_plugin.errors.TargetUnreachable: target_latency_ratio=0.4 is out of reach "
        "with this criterion and settings\n  a continuation line\n")
    error = ("kcp_plugin.errors.TargetUnreachable: target_latency_ratio=0.4 is out of reach "
             "with this criterion and settings")
    for log in (str(folder), f"file://localhost{folder}"):
        job = types.SimpleNamespace(trialJobId="Zx9", sequenceId=3, status="FAILED",
                                    hyperParameters=[], logPath=log, startTime=0, endTime=0)
        row = search._trial_row(job, {})
        assert row["error"] == error
    assert f"FAILED  error {error}  log {row['log']}" in search.format_trial(row, "miou")
    assert f"- Zx9 (FAILED): {error}; log in" in search.summarize([row], tmp_path / "s",
                                                                  metric="miou")
    job.logPath = str(tmp_path / "missing")
    assert "error" not in search._trial_row(job, {})


def test_latency_config_is_read_by_nni_without_its_latency_section():
    config = kcp_plugin_root() / "configs/nni/experiment_latency.yml"
    nni_config = search._experiment_config(config)
    assert nni_config.trial_concurrency == 1 and nni_config.tuner.name == "TPE"
    section = search.config_latency(config)
    search.check_latency_options(section)
    with open(kcp_plugin_root() / "configs/nni/search_space_latency.json") as f:
        space = json.load(f)
    backend = search.check_latency(space, search.SearchSettings(latency=section))
    assert (backend.name, backend.threads, backend.batch) == ("torch", 1, 1)
    assert search.config_latency(kcp_plugin_root() / "configs/nni/experiment.yml") is None


def test_benchmark_training_refuses_a_loader_without_batches():
    """Fewer samples than a batch with drop_last used to make the training loop (and the NNI
    search built on it) wait forever for a batch."""
    from kcp_plugin.bench import get_task, make_loader, train

    task = get_task("segmentation")
    train_ds, _ = task.splits(0, 4, 2)
    loader = make_loader(train_ds, 8, 0)
    with pytest.raises(ValueError, match="yields no batch .*4 samples, batch size 8"):
        train(task.build(0), task, loader, steps=3, lr=1e-3, progress=False)
