"""Latency tables and the latency model (kcp_plugin.deploy.table), on a stand-in clock whose
cost is known: layers traced with their shapes, identical layers measured once, the grid on
the backend's multiple, predictions against end-to-end measurements, the disk cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from fake_clock import CostClock

import kcp_plugin
from kcp_plugin.deploy.table import LatencyModel, LatencyTable, trace_layers, width_step
from kcp_plugin.models import build_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20").eval()


X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_layers_are_traced_with_their_shapes_at_the_backend_batch():
    calls = trace_layers(_net(), X, batch=8)
    by_name = {c.name: c for c in calls}
    assert by_name["conv1"].shape == (8, 3, 32, 32) and by_name["conv1"].cout == 16
    assert by_name["fc"].shape == (8, 64) and by_name["fc"].is_linear
    assert by_name["layer3.0.conv1"].out_per_channel == 8 * 8 * 8  # stride 2: 8x8 maps
    # identical layers share a signature: resnet20's 22 layer calls have 9
    assert len({c.spec() for c in calls}) < len(calls)


def test_depthwise_and_grouped_convs_keep_their_grouping():
    net = nn.Sequential(nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                        nn.Conv2d(32, 64, 3, padding=1, groups=4))
    calls = trace_layers(net, torch.randn(1, 8, 8, 8))
    assert calls[1].depthwise and not calls[2].depthwise
    assert calls[1].build(16, 16).groups == 16  # pruned depthwise: groups follow the width
    assert calls[2].build(16, 32).groups == 4
    assert calls[2].widths_ok(16, 32) and not calls[2].widths_ok(18, 32)


@pytest.mark.parametrize("width, multiple, groups, step", [
    (256, 8, 1, 8), (24, 8, 1, 4), (16, 32, 1, 4), (256, 32, 1, 32), (64, 8, 32, 32),
    (3, 8, 1, 1)])
def test_width_steps_follow_the_backend_multiple(width, multiple, groups, step):
    assert width_step(width, multiple, groups) == step


def test_identical_layers_are_measured_once_on_an_aligned_grid():
    clock = CostClock()
    table = LatencyTable(kcp_plugin.Backend(timer=clock, runs=3), levels=4)
    calls = trace_layers(_net(), X)
    entries = [(c, True, True) for c in calls]
    table.ensure(entries)
    signatures = {table.key(c, True, True) for c in calls}
    # one grid per signature; a layer of width w is measured at <= 4 widths per side
    assert table.measured <= 16 * len(signatures)
    measured = table.measured
    table.ensure(entries)
    assert table.measured == measured  # known grids are not measured again
    call = next(c for c in calls if c.name == "layer2.1.conv1")
    widths = table.grid_widths(call.cin, True, width_step(call.cin, 8))
    assert widths[-1] == 32 and all(w % 8 == 0 for w in widths)


def test_the_table_interpolates_the_clock_between_grid_points():
    clock = CostClock(penalty=0.0, act_ms=0.0, overhead_ms=0.0)
    table = LatencyTable(kcp_plugin.Backend(timer=clock, runs=3), levels=5)
    call = next(c for c in trace_layers(_net(), X) if c.name == "layer3.1.conv1")
    table.ensure([(call, True, True)])
    for cin, cout in ((64, 64), (40, 24), (56, 48)):
        exact = clock.layer_ms(call.build(cin, cout), call.out_per_channel * cout)
        assert table.cost(call, True, True, cin, cout) == pytest.approx(exact, rel=0.15)


def test_the_model_predicts_pruned_nets_after_calibration():
    """Calibrated on the dense net and one pruned net, the model predicts other pruned nets of
    the stand-in clock (layers + activations + overhead) within 5%."""
    clock = CostClock(multiple=8, penalty=1.0)
    backend = kcp_plugin.Backend(timer=clock, runs=3)
    dense = _net()
    calls = trace_layers(dense, X)
    model = LatencyModel(LatencyTable(backend, levels=6), [(c, True, True) for c in calls])
    measure = lambda m: kcp_plugin.compare_latency([m], X, backend=backend)[0].median_ms  # noqa
    model.add_measurement({}, measure(dense))
    assert 0.5 < model.table_share <= 1.1
    first = _net()
    kcp_plugin.prune(first, X, "l1", pruning_ratio=0.5, round_to=8)
    model.add_measurement(model.widths_of(first), measure(first))
    for ratio, multiple in ((0.3, 8), (0.6, 8), (0.75, 8)):  # the widths the grid holds
        other = _net()
        kcp_plugin.prune(other, X, "l1", pruning_ratio=ratio, round_to=multiple)
        predicted = model.predict(model.widths_of(other))
        assert predicted == pytest.approx(measure(other), rel=0.05), (ratio, multiple)


def test_tables_are_cached_on_disk_per_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("KCP_CACHE", str(tmp_path))
    calls = [(c, True, True) for c in trace_layers(_net(), X)][:3]
    table = LatencyTable(kcp_plugin.Backend(runs=3), levels=3)
    table.ensure(calls)
    assert table.measured > 0
    files = list((tmp_path / "latency").glob("torch-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["backend"]["name"] == "torch"
    again = LatencyTable(kcp_plugin.Backend(runs=3), levels=3)
    again.ensure(calls)
    assert again.measured == 0  # read from the cache
    other = LatencyTable(kcp_plugin.Backend(runs=3, batch=2), levels=3)
    other.ensure(calls)
    assert other.measured > 0  # another batch is another table
    # a stand-in clock never writes the cache
    LatencyTable(kcp_plugin.Backend(timer=CostClock()), levels=3).ensure(calls)
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2


def test_an_unreadable_cache_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KCP_CACHE", str(tmp_path))
    table = LatencyTable(kcp_plugin.Backend(runs=3), levels=3)
    table._path.parent.mkdir(parents=True)
    table._path.write_text("{not json")
    with caplog.at_level("WARNING"):
        LatencyTable(kcp_plugin.Backend(runs=3), levels=3)
    assert "unreadable latency table cache" in caplog.text
