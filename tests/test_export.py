"""ONNX export of pruned models (kcp_plugin.export) and onnxruntime latency: the file agrees with
torch, runs at other batch sizes, is written whole or not at all, and failures name the operator
and the layer."""

from __future__ import annotations

import copy
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import kcp_plugin
from kcp_plugin.deploy.export import export_onnx, inference_session
from kcp_plugin.errors import ExportError
from kcp_plugin.models import build_model, example_inputs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(path, report, inputs):
    """The file's outputs in onnxruntime, as torch tensors."""
    return [torch.from_numpy(o) for o in inference_session(path, 1).run(None,
                                                                         report.feeds(inputs))]


def _torch(model, inputs):
    with torch.no_grad():
        model.eval()
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def test_pruned_convnet_exports_agrees_and_runs_at_another_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20")  # in training mode: export must not change that
    x = example_inputs("resnet20", batch=1)
    kcp_plugin.prune(model, x, "l2", pruning_ratio=0.5, progress=False)
    plan = kcp_plugin.get_plan(model)
    path = tmp_path / "r20.onnx"
    report = kcp_plugin.export_onnx(model, x, path)
    assert report.path == str(path) and path.stat().st_size > 0
    assert report.input_names == ("input",) and report.output_names == ("output",)
    assert report.dynamic_batch and report.opset >= 13
    assert report.providers == ("CPUExecutionProvider",)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert model.training and kcp_plugin.get_plan(model) == plan
    assert sorted(os.listdir(tmp_path)) == ["r20.onnx"]  # no temporary file left
    # exported at batch 1, run at batch 3 on other data
    x3 = torch.randn(3, 3, 32, 32)
    (got,) = _run(path, report, x3)
    ref = _torch(model, x3)
    assert got.shape == ref.shape == (3, 10)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_stereo_net_with_its_cost_volume_exports(tmp_path):
    torch.manual_seed(0)
    model = build_model("stereo_lite").eval()
    x = example_inputs("stereo_lite", batch=1, size=(32, 64))
    kcp_plugin.prune(model, x, "l2", pruning_ratio=0.4, ignored_layers=["classifier"],
                     progress=False)
    report = export_onnx(model, x, tmp_path / "stereo.onnx")
    assert report.input_names == ("input.0", "input.1") and report.max_abs_diff < 1e-3
    pair = (torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64))
    (got,) = _run(report.path, report, pair)
    ref = _torch(model, pair)
    assert got.shape == ref.shape == (2, 32, 64)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_pruned_timm_vit_exports(tmp_path):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    kcp_plugin.prune(model, x, "l2", target_macs_ratio=0.6, progress=False)
    assert model.head.in_features < 192
    report = export_onnx(model, x, tmp_path / "vit.onnx")
    assert report.max_abs_diff < 1e-3
    x2 = torch.randn(2, 3, 32, 32)
    (got,) = _run(report.path, report, x2)
    assert torch.allclose(got, _torch(model, x2), rtol=1e-3, atol=1e-4)


class Segmentor(nn.Module):
    """mmseg-like: ``forward(x, mode)`` with a tensor mode, dict outputs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)
        self.aux = nn.Conv2d(8, 4, 1)

    def forward(self, x, mode="loss"):
        if mode != "tensor":
            raise ValueError("only mode='tensor' returns tensors")
        f = self.body(x)
        return {"out": self.head(f), "aux": self.aux(f)}


def test_forward_fn_and_every_output_are_checked(tmp_path):
    torch.manual_seed(0)
    model = Segmentor()
    x = torch.randn(1, 3, 16, 16)
    report = export_onnx(model, x, tmp_path / "seg.onnx",
                         forward_fn=lambda m, inp: m(inp, mode="tensor"))
    assert report.output_names == ("output.out", "output.aux")
    got = _run(report.path, report, x)
    with torch.no_grad():
        ref = model.eval()(x, mode="tensor")
    assert torch.allclose(got[1], ref["aux"], atol=1e-5)
    with pytest.raises(ExportError, match="only mode='tensor'"):  # without forward_fn
        export_onnx(model, x, tmp_path / "plain.onnx")


def test_mmseg_segmentor_exports_through_tensor_mode(tmp_path):
    # mmseg and mmcv's compiled ops: the test command installs both (tools/install_mmcv.sh)
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "mmseg",
                          "fcn_r18-tiny_kcp50_generated-64x64_cpu.py")
    model = MODELS.build(Config.fromfile(config).model)
    report = export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "fcn.onnx",
                         forward_fn=lambda m, x: m(x, mode="tensor"))
    assert report.max_abs_diff < 1e-3 and report.output_names == ("output",)


class Histogram(nn.Module):
    def forward(self, x):
        return torch.histc(x, bins=8).expand(x.shape[0], 8)


class TraceRefuser(nn.Module):
    def forward(self, x):
        if torch.jit.is_tracing():
            raise NotImplementedError("this layer has no export path")
        return x


@pytest.mark.parametrize("layer,op,message", [
    (Histogram(), "aten::histc", "operator aten::histc in layer 'body.1' (Histogram)"),
    (TraceRefuser(), None, "the forward pass in layer 'body.1' (TraceRefuser)"),
])
def test_an_unexportable_layer_is_named_and_nothing_is_written(tmp_path, layer, op, message):
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Conv2d(3, 4, 3), layer))
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"previous file")
    with pytest.raises(ExportError, match=re.escape(message)) as info:
        export_onnx(model, torch.randn(1, 3, 8, 8), path)
    assert info.value.op == op and info.value.layer == "body.1"
    assert path.read_bytes() == b"previous file"  # not replaced, no temporary file left
    assert os.listdir(tmp_path) == ["bad.onnx"]


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


class TinyNoisy(nn.Module):
    """Outputs of magnitude 1e-8 (as random-init nets give): a disagreement must still count."""

    def forward(self, x):
        return 1e-8 * (x + torch.rand_like(x))


class BakedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(int(x.shape[0]), -1)  # the trace keeps the example's batch size


@pytest.mark.parametrize("model,message", [
    (Noisy(), r"onnxruntime and torch disagree, max \|difference\| "),
    (TinyNoisy(), r"onnxruntime and torch disagree, max \|difference\| "),
    (BakedBatch(), "a batch twice the example's"),
])
def test_a_file_that_disagrees_with_torch_is_refused(tmp_path, model, message):
    with pytest.raises(ExportError, match=message):
        export_onnx(model, torch.randn(1, 3, 4, 4), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
    # without dynamic batch the baked reshape is right for the example's shape
    if isinstance(model, BakedBatch):
        report = export_onnx(model, torch.randn(1, 3, 4, 4), tmp_path / "m.onnx",
                             dynamic_batch=False)
        assert report.max_abs_diff == 0.0


def test_missing_folder_and_missing_extra_are_explained(tmp_path, monkeypatch):
    model, x = nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4)
    with pytest.raises(FileNotFoundError, match="folder .*no_such_folder does not exist"):
        export_onnx(model, x, tmp_path / "no_such_folder" / "m.onnx")
    with pytest.raises(IsADirectoryError):
        export_onnx(model, x, tmp_path)
    with pytest.raises(ValueError, match="hold no tensor"):
        export_onnx(model, [1, 2], tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install kcp-plugin\[deploy\]"):
        export_onnx(model, x, tmp_path / "m.onnx")
    with pytest.raises(ImportError, match=r"pip install kcp-plugin\[deploy\]"):
        kcp_plugin.compare_latency([model], x, runs=1, backend="onnxruntime")
    assert os.listdir(tmp_path) == []


def test_onnxruntime_latency_times_dense_and_pruned(tmp_path):
    torch.manual_seed(0)
    pruned = build_model("resnet20").eval()
    dense = copy.deepcopy(pruned)
    x = example_inputs("resnet20")
    kcp_plugin.prune(pruned, x, "l2", pruning_ratio=0.5, progress=False)
    stats = kcp_plugin.compare_latency([dense, pruned], x, warmup=1, runs=5, threads=1,
                                       backend="onnxruntime")
    assert [s.backend for s in stats] == ["onnxruntime"] * 2
    assert all(s.runs == 5 and s.threads == 1 and 0 < s.q1_ms <= s.median_ms <= s.q3_ms
               for s in stats)
    ms = kcp_plugin.measure_latency(pruned, x, runs=2, backend="onnxruntime")
    assert ms > 0 and np.isfinite(ms)
    with pytest.raises(ValueError, match="valid: torch, onnxruntime"):
        kcp_plugin.compare_latency([dense], x, backend="tensorrt")
