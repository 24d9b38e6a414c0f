"""Latency backends (kcp_plugin.Backend): the record's checks, placement, and the measurement
loop on a stand-in clock, so the CUDA backend's logic is tested on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from fake_clock import CostClock

import kcp_plugin
from kcp_plugin.deploy.backends import as_backend, batched, check_backend, placed
from kcp_plugin.deploy.latency import timed_passes
from kcp_plugin.models import build_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20").eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec, match", [
    (dict(name="tensorrt"), "valid: torch, onnxruntime, cuda"),
    (dict(name="cuda", dtype="int8", timer=CostClock()),
     "cannot run dtype 'int8'; valid: fp32, fp16"),
    (dict(name="onnxruntime", dtype="bf16"), "valid: fp32"),
    (dict(name="torch", dtype="fp16"), "valid: fp32, bf16"),
    (dict(name="torch", batch=0), "batch must be an integer >= 1"),
    (dict(name="torch", runs=0), "runs must be"),
    (dict(name="torch", device="cuda"), "runs on the CPU"),
    (dict(name="cuda", device="cpu", timer=CostClock()), "runs on a GPU"),
])
def test_bad_backends_name_the_valid_choices(spec, match):
    with pytest.raises(ValueError, match=match):
        check_backend(kcp_plugin.Backend(**spec))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_the_model_is_touched():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        kcp_plugin.prune(model, X[:1], "l1", target_latency_ratio=0.5,
                         latency_backend=kcp_plugin.Backend("cuda", dtype="bf16", batch=64))
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        kcp_plugin.compare_latency([model], X, backend="cuda")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_backend_from_a_name_a_dict_or_a_record():
    assert as_backend("cuda").is_cuda
    assert as_backend({"name": "onnxruntime", "threads": 2}).threads == 2
    b = kcp_plugin.Backend("cuda", dtype="bf16", batch=64)
    assert as_backend(b, runs=5).runs == 5 and as_backend(b, runs=None).runs == 10
    with pytest.raises(TypeError, match="unknown field.*dtyp.*close matches: dtype"):
        as_backend({"name": "cuda", "dtyp": "bf16"})
    with pytest.raises(TypeError, match="a name"):
        as_backend(3)


def test_a_speed_figure_names_hardware_backend_dtype_and_batch():
    b = kcp_plugin.Backend("cuda", dtype="bf16", batch=64, timer=CostClock())
    text = b.describe()
    for part in ("cuda", "bf16", "batch 64", "channels_last", "eager"):
        assert part in text
    assert "1 thread" in kcp_plugin.Backend("onnxruntime").describe()
    assert kcp_plugin.Backend("cuda").channel_multiple() == 32
    assert kcp_plugin.Backend("onnxruntime").channel_multiple() == 8


def test_inputs_are_batched_to_the_backend_batch():
    x = torch.randn(2, 3, 4, 4)
    grown = batched(x, 5)
    assert grown.shape == (5, 3, 4, 4) and torch.equal(grown[2:4], x)
    pair = batched((x, torch.zeros(2, 1), torch.ones(7)), 4)  # a non-batch tensor is kept
    assert pair[0].shape[0] == 4 and pair[1].shape[0] == 4 and pair[2].shape == (7,)
    assert batched({"a": x}, None)["a"] is x


def test_placement_casts_a_copy_never_the_users_model():
    model = _net()
    b = kcp_plugin.Backend("torch", dtype="bf16", batch=3)
    moved, inputs = placed(model, X, b)
    assert moved is not model and next(moved.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    assert inputs.shape[0] == 3 and inputs.dtype == torch.bfloat16
    same, x = placed(model, X, kcp_plugin.Backend("torch"))
    assert same is model and x is X


def test_the_measurement_loop_interleaves_warms_up_and_takes_the_median():
    order = []
    ticks = iter([5.0, 1.0, 9.0, 2.0, 3.0, 4.0, 7.0, 8.0])

    def clock(model, call):
        order.append(model)
        call()
        return next(ticks)

    a, b = nn.Identity(), nn.Identity()
    times = timed_passes([(a, lambda: None), (b, lambda: None)],
                         kcp_plugin.Backend(runs=3, warmup=1, timer=clock))
    assert order == [a, b, a, b, a, b, a, b]  # interleaved, warm-up pass first
    assert times == [[9.0, 3.0, 7.0], [2.0, 4.0, 8.0]]


def test_compare_latency_with_a_stand_in_clock_on_the_cuda_backend():
    """The CUDA backend's whole path (batch, dtype, channels-last, clock) without a GPU."""
    clock = CostClock(multiple=8, penalty=1.0)
    dense, narrow = _net(), _net()
    pruned_report = kcp_plugin.prune(narrow, X[:1], "l1", pruning_ratio=0.5)
    assert pruned_report.macs_after < pruned_report.macs_before
    b = kcp_plugin.Backend("cuda", dtype="bf16", batch=4, runs=3, timer=clock)
    d, p = kcp_plugin.compare_latency([dense, narrow], X, backend=b)
    assert d.backend == "cuda" and d.dtype == "bf16" and d.batch == 4
    assert d.hardware == "stand-in clock" and d.threads is None
    # the clock saw the batch of 4: twice the MACs of the batch of 2
    d2 = kcp_plugin.compare_latency([dense], X, backend=kcp_plugin.Backend(
        "cuda", dtype="bf16", batch=2, runs=3, timer=clock))[0]
    assert d.median_ms - clock.overhead_ms == pytest.approx(2 * (d2.median_ms
                                                                 - clock.overhead_ms))
    assert p.median_ms < d.median_ms


def test_a_batch_that_does_not_run_is_refused_before_pruning():
    class NeedsBatchOf2(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)

        def forward(self, x):
            if x.shape[0] > 2:
                raise RuntimeError("CUDA out of memory (stand-in)")
            return self.conv(x)

    model = NeedsBatchOf2()
    with pytest.raises(ValueError, match="batch 64 does not fit"):
        kcp_plugin.prune(model, X[:1], "l1", target_macs_ratio=0.5,
                         latency_backend=kcp_plugin.Backend("torch", batch=64))

