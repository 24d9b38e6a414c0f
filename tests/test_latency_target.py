"""prune(..., target_latency_ratio=r): the search, the refusals and round_to="auto".

The search logic is tested against a deterministic stand-in for the measurement (latency as a
function of the pruned model's widths), so the tests do not depend on this machine's load;
one real measurement per backend checks the wiring. Reaching a latency target on real models
is measured in tools/bench_deploy.py, not here.
"""

from __future__ import annotations

import pytest
import torch

import kcp_plugin
import kcp_plugin.latency_search as search
from kcp_plugin.latency import LatencyStats
from kcp_plugin.models import build_model
from kcp_plugin.safety import UnprunableError


def _model():
    torch.manual_seed(0)
    return build_model("resnet20").eval()


X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fake_latency(floor: float = 0.0, aligned_bonus: float = 1.0):
    """A measurement stand-in: latency = floor + MACs (dense = 1), times ``aligned_bonus`` when
    every conv width is a multiple of 8 (what vectorised kernels like)."""
    dense = kcp_plugin.count_macs_params(_model(), X)[0]

    def latency(model) -> float:
        macs = kcp_plugin.count_macs_params(model, X)[0]
        widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        bonus = aligned_bonus if all(w % 8 == 0 for w in widths) else 1.0
        return (floor + (1 - floor) * macs / dense) * bonus

    def compare(models, example_inputs, forward_fn=None, warmup=3, runs=10, threads=1,
                backend="torch"):
        return [LatencyStats(latency(m), latency(m), latency(m), runs, threads, backend)
                for m in models]

    return compare


def test_latency_target_is_reached_and_reported(monkeypatch):
    monkeypatch.setattr(search, "compare_latency", _fake_latency(floor=0.3))
    model = _model()
    report = kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.6)
    kept = report.latency_after_ms / report.latency_before_ms
    assert abs(kept - 0.6) <= 0.05
    # latency = 0.3 + 0.7 * MACs: 0.6 of the latency needs ~0.43 of the MACs, not 0.6
    assert report.macs_after / report.macs_before == pytest.approx((kept - 0.3) / 0.7, abs=0.03)
    assert report.target_latency_ratio == 0.6 and report.latency_backend == "torch"
    assert report.latency_search and all(k == 1 for _, k, _ in report.latency_search)
    assert kcp_plugin.get_plan(model)["history"], "the model itself was not pruned"


def test_unreachable_latency_target_is_refused_untouched(monkeypatch):
    monkeypatch.setattr(search, "compare_latency", _fake_latency(floor=0.7))
    model = _model()
    before = _state(model)
    with pytest.raises(UnprunableError, match="target_latency_ratio=0.5 is out of reach"):
        kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_round_to_auto_keeps_the_fastest_multiple(monkeypatch):
    monkeypatch.setattr(search, "compare_latency", _fake_latency(aligned_bonus=0.7))
    model = _model()
    report = kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.5, round_to="auto")
    assert report.round_to in (8, 16)
    assert all(m.out_channels % report.round_to == 0 for m in model.modules()
               if isinstance(m, torch.nn.Conv2d))
    tried = {k for _, k, _ in report.latency_search}
    # resnet20's 16-wide stages cannot lose channels in multiples of 16: that one is skipped
    assert tried == {1, 8}


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_latency_ratio=0.5, target_macs_ratio=0.5), "give one target"),
    (dict(target_latency_ratio=0.5, dry_run=True), "cannot be a dry run"),
    (dict(target_macs_ratio=0.5, latency_backend="ort"), "valid: torch, onnxruntime"),
    (dict(target_latency_ratio=1.5), r"target_latency_ratio must be in \(0, 1\]"),
    (dict(target_latency_ratio=0.5, latency_backend="tensorrt"), "valid: torch, onnxruntime"),
    (dict(target_latency_ratio=0.5, latency_runs=1), "latency_runs must be"),
    (dict(target_macs_ratio=0.5, round_to="auto"), "needs target_latency_ratio"),
    (dict(target_latency_ratio=0.5, importance_kwargs={"nope": 1}), "nope"),
    (dict(target_latency_ratio=0.5, ignored_layers=["no.such.layer"]), "no.such.layer"),
])
def test_bad_latency_arguments_are_refused_before_measuring(kwargs, match, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("measured before validating")

    monkeypatch.setattr(search, "compare_latency", never)
    model = _model()
    before = _state(model)
    importance = kwargs.pop("importance", "kcp")
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        kcp_plugin.prune(model, X, importance, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_latency_target_measures_for_real(backend):
    """The wiring with real measurements (no latency figure asserted: this machine is shared)."""
    model = _model()
    report = kcp_plugin.prune(model, X, "l1", target_latency_ratio=0.7, latency_runs=3,
                              latency_backend=backend, latency_tolerance=0.5)
    assert report.latency_backend == backend and report.latency_search
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    assert report.macs_after <= report.macs_before


def test_the_chosen_model_is_measured_again(monkeypatch, caplog):
    """The closest trial is the likeliest noise outlier: the pruned model is measured once more,
    the report gives that measurement, and a disagreement beyond the tolerance is a warning."""
    calls = []
    honest = _fake_latency(floor=0.3)

    def outlier_then_honest(models, *args, **kwargs):
        stats = honest(models, *args, **kwargs)
        calls.append(len(calls))
        if len(calls) == 1:  # the first trial looks exactly on target, by luck
            dense = stats[0]
            return [dense, LatencyStats(0.6 * dense.median_ms, 0, 0, 3, 1, "torch")]
        return stats

    monkeypatch.setattr(search, "compare_latency", outlier_then_honest)
    model = _model()
    with caplog.at_level("WARNING", logger="kcp_plugin.latency_search"):
        report = kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.6)
    kept = report.latency_after_ms / report.latency_before_ms
    assert report.latency_search[-1][2] == pytest.approx(kept)
    assert kept == pytest.approx(0.3 + 0.7 * report.macs_after / report.macs_before, abs=1e-6)
    assert "measurements are unstable" in caplog.text
