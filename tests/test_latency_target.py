"""prune(..., target_latency_ratio=r): both allocations, the refusals, round_to="auto" and the
MACs path's default channel multiple.

The logic is tested against deterministic stand-ins for the measurement (latency as a function
of the pruned model's widths: a patched ``compare_latency`` for the uniform search, a
stand-in clock, ``kcp_plugin.Backend(timer=...)``, for the table allocation), so the tests do
not depend on this machine's load; one real measurement per backend checks the wiring.
Reaching a latency target on real models is measured in tools/bench_deploy.py, not here.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from fake_clock import CostClock

import kcp_plugin
import kcp_plugin.deploy.search as search
from kcp_plugin.deploy.latency import LatencyStats
from kcp_plugin.models import build_model


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

    def compare(models, example_inputs, forward_fn=None, warmup=None, runs=None, threads=None,
                backend="torch"):
        name = getattr(backend, "name", backend)
        return [LatencyStats(latency(m), latency(m), latency(m), runs or 10, threads or 1, name)
                for m in models]

    return compare


def test_latency_target_is_reached_and_reported(monkeypatch):
    monkeypatch.setattr(search, "compare_latency", _fake_latency(floor=0.3))
    model = _model()
    report = kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.6,
                              latency_allocation="uniform", round_to=1)
    kept = report.latency_after_ms / report.latency_before_ms
    assert abs(kept - 0.6) <= 0.025
    # latency = 0.3 + 0.7 * MACs: 0.6 of the latency needs ~0.43 of the MACs, not 0.6
    assert report.macs_after / report.macs_before == pytest.approx((kept - 0.3) / 0.7, abs=0.03)
    assert report.target_latency_ratio == 0.6 and report.latency_backend == "torch"
    assert report.latency_search and all(k == 1 for _, k, _ in report.latency_search)
    assert kcp_plugin.get_plan(model)["history"], "the model itself was not pruned"


def test_unreachable_latency_target_is_refused_untouched(monkeypatch):
    monkeypatch.setattr(search, "compare_latency", _fake_latency(floor=0.7))
    model = _model()
    before = _state(model)
    with pytest.raises(kcp_plugin.TargetUnreachable,
                       match="target_latency_ratio=0.5 is out of reach"):
        kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.5,
                         latency_allocation="uniform")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_round_to_auto_keeps_the_fastest_multiple(monkeypatch):
    monkeypatch.setattr(search, "compare_latency", _fake_latency(aligned_bonus=0.7))
    model = _model()
    report = kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.5, round_to="auto",
                              latency_allocation="uniform")
    assert report.round_to in (8, 16)
    assert all(m.out_channels % report.round_to == 0 for m in model.modules()
               if isinstance(m, torch.nn.Conv2d))
    tried = {k for _, k, _ in report.latency_search}
    # every multiple is measured (resnet20's 16-wide stage keeps one multiple of 16 and the
    # other stages are pruned: torch-pruning alone would round it to nothing and skip it)
    assert tried == {1, 8, 16}


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_latency_ratio=0.5, target_macs_ratio=0.5, latency_allocation="uniform"),
     "combines with latency_allocation='table' only"),
    (dict(target_latency_ratio=0.5, pruning_ratio=0.5), "give one target"),
    (dict(target_latency_ratio=0.5, dry_run=True), "cannot be a dry run"),
    (dict(target_macs_ratio=0.5, latency_backend="ort"), "valid: torch, onnxruntime, cuda"),
    (dict(target_latency_ratio=1.5), r"target_latency_ratio must be in \(0, 1\]"),
    (dict(target_latency_ratio=0.5, latency_backend="tensorrt"), "valid: torch, onnxruntime"),
    (dict(target_latency_ratio=0.5, latency_backend=kcp_plugin.Backend(runs=1)),
     "needs >= 3 timed passes"),
    (dict(target_macs_ratio=0.5, round_to="auto"), "needs target_latency_ratio"),
    (dict(target_latency_ratio=0.5, round_to=8), "round_to does not apply"),
    (dict(target_latency_ratio=0.5, global_pruning=True), "global_pruning / isomorphic"),
    (dict(target_latency_ratio=0.5, latency_allocation="knapsack"),
     "unknown latency_allocation 'knapsack'; valid: table, uniform"),
    (dict(target_latency_ratio=0.5, latency_backend={"name": "torch", "dtyp": "bf16"}),
     "close matches: dtype"),
    (dict(target_latency_ratio=0.5, importance_kwargs={"nope": 1}), "nope"),
    (dict(target_latency_ratio=0.5, ignored_layers=["no.such.layer"]), "no.such.layer"),
    (dict(target_latency_ratio=0.5, ignored_layers=["no.such.layer"],
          latency_allocation="uniform"), "no.such.layer"),
])
def test_bad_latency_arguments_are_refused_before_measuring(kwargs, match, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("measured before validating")

    monkeypatch.setattr(search, "compare_latency", never)
    monkeypatch.setattr(kcp_plugin.deploy.table.LatencyTable, "ensure", never)
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
    report = kcp_plugin.prune(model, X, "l1", target_latency_ratio=0.7,
                              latency_backend=kcp_plugin.Backend(backend, runs=3),
                              latency_tolerance=0.5, latency_allocation="uniform")
    assert report.latency_backend == backend and report.latency_search
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    assert report.macs_after <= report.macs_before


def test_the_chosen_model_is_measured_again(monkeypatch):
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
    with pytest.warns(UserWarning, match="measurements are unstable"):
        report = kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.6,
                                  latency_allocation="uniform", round_to=1)
    kept = report.latency_after_ms / report.latency_before_ms
    assert report.latency_search[-1][2] == pytest.approx(kept)
    assert kept == pytest.approx(0.3 + 0.7 * report.macs_after / report.macs_before, abs=1e-6)


# ------------------------------------------------------------------------ table allocation
def _wide():
    torch.manual_seed(0)
    return build_model("resnet20", width=32).eval()


def _clock_backend(**clock) -> kcp_plugin.Backend:
    return kcp_plugin.Backend(timer=CostClock(**clock), runs=3)


def test_table_allocation_reaches_the_target_with_aligned_widths():
    model = _wide()
    backend = _clock_backend(multiple=8, penalty=1.0)
    report = kcp_plugin.prune(model, X, "l2", target_latency_ratio=0.5, latency_backend=backend)
    kept = report.latency_after_ms / report.latency_before_ms
    assert abs(kept - 0.5) <= 0.025
    assert report.latency_allocation == "table" and report.latency_setting
    for name, width in report.widths_after.items():
        if width != report.widths_before[name]:
            assert width % 8 == 0, (name, width)  # removed in steps of the multiple
    summary = report.latency_model
    assert summary["trials"] and summary["table_share"] > 0.5
    assert summary["calibrated_max_abs_error"] is None \
        or summary["calibrated_max_abs_error"] < 0.15
    assert set(summary["predicted_widths"]) >= {"layer1.0.conv1", "fc"}
    # the plan replays the chosen widths
    copy = kcp_plugin.load_pruned(_wide, _save(model), X)
    assert kcp_plugin.count_macs_params(copy, X) == kcp_plugin.count_macs_params(model, X)


def _save(model, path=[0]):  # noqa: B006 - a counter for unique file names
    import tempfile

    path[0] += 1
    folder = tempfile.mkdtemp()
    out = f"{folder}/m{path[0]}.pt"
    kcp_plugin.save_pruned(model, out)
    return out


def test_table_allocation_keeps_more_capacity_than_uniform_widths_at_equal_latency():
    """Where odd widths cost time (the clock's penalty), one uniform ratio with plain widths
    wastes latency on them; the table allocation keeps more MACs at the same latency."""
    backend = _clock_backend(multiple=8, penalty=1.0)
    table, uniform = _wide(), _wide()
    t = kcp_plugin.prune(table, X, "l2", target_latency_ratio=0.5, latency_backend=backend)
    u = kcp_plugin.prune(uniform, X, "l2", target_latency_ratio=0.5, latency_backend=backend,
                         latency_allocation="uniform", round_to=1)
    t_kept = t.latency_after_ms / t.latency_before_ms
    u_kept = u.latency_after_ms / u.latency_before_ms
    # the uniform search moves in jumps here (one ratio for every group): it may stop short
    assert abs(t_kept - 0.5) <= 0.025 and u_kept <= 0.55
    assert t.macs_ratio / t_kept > u.macs_ratio / u_kept


def test_a_macs_budget_combines_with_the_latency_target():
    model = _wide()
    report = kcp_plugin.prune(model, X, "l2", target_latency_ratio=0.9, target_macs_ratio=0.4,
                              latency_backend=_clock_backend())
    assert report.macs_ratio <= 0.42
    assert report.latency_after_ms / report.latency_before_ms <= 0.9 + 0.025


def test_an_unreachable_table_target_is_refused_with_the_model_untouched():
    model = _wide()
    before = _state(model)
    with pytest.raises(kcp_plugin.TargetUnreachable, match="out of reach"):
        kcp_plugin.prune(model, X, "l2", target_latency_ratio=0.3,
                         latency_backend=_clock_backend(overhead_ms=1e4))  # all overhead
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not kcp_plugin.get_plan(model).get("history")


def test_an_interrupt_during_the_allocation_leaves_the_model_as_it_was():
    clock = CostClock()
    calls = [0]

    def interrupting(model, call):
        calls[0] += 1
        if calls[0] > 400:  # inside the trials, after the table
            raise KeyboardInterrupt
        return clock(model, call)

    model = _wide()
    before = _state(model)
    params = [id(p) for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        kcp_plugin.prune(model, X, "l2", target_latency_ratio=0.5,
                         latency_backend=kcp_plugin.Backend(timer=interrupting, runs=3))
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_table_allocation_with_a_data_criterion():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    model = _wide()
    report = kcp_plugin.prune(model, X, "fisher", target_latency_ratio=0.6, data=batches,
                              latency_backend=_clock_backend())
    assert abs(report.latency_after_ms / report.latency_before_ms - 0.6) <= 0.025


# ------------------------------------------------------------- MACs path: default multiple
def test_a_macs_target_rounds_to_the_backend_multiple_by_default():
    model = _wide()  # widths 32-128: multiples of 8 fit
    report = kcp_plugin.prune(model, X, "l2", target_macs_ratio=0.4)
    assert report.round_to == 8 and abs(report.macs_ratio - 0.4) <= 0.02
    assert all(w % 8 == 0 for n, w in report.widths_after.items() if n != "fc")
    plain = _wide()
    again = kcp_plugin.prune(plain, X, "l2", target_macs_ratio=0.4, round_to=1)
    assert again.round_to is None  # round_to=1: torch-pruning's widths, as before
    assert any(w % 8 for n, w in again.widths_after.items() if n != "fc")


def test_narrow_nets_get_a_finer_default_multiple_and_still_reach_the_target():
    model = _model()  # resnet20: 16-64 channels
    report = kcp_plugin.prune(model, X, "l2", target_macs_ratio=0.3)
    assert abs(report.macs_ratio - 0.3) <= 0.02
    assert report.round_to in (None, 2, 4)


def test_a_prune_slower_than_dense_on_the_named_backend_warns():
    """A clock that punishes odd widths 20-fold: plain widths at 0.9 of the MACs are slower."""
    model = _wide()
    with pytest.warns(UserWarning, match="slower than the dense one"):
        report = kcp_plugin.prune(model, X, "l2", target_macs_ratio=0.9, round_to=1,
                                  latency_backend=_clock_backend(penalty=20.0))
    assert report.latency_after_ms > report.latency_before_ms
    assert "stand-in clock" in report.table()


def test_deprecated_latency_keywords_still_work_with_a_warning(monkeypatch):
    monkeypatch.setattr(search, "compare_latency", _fake_latency(floor=0.3))
    model = _model()
    with pytest.warns(FutureWarning, match="latency_threads / latency_runs are deprecated"):
        report = kcp_plugin.prune(model, X, "kcp", target_latency_ratio=0.6, latency_runs=3,
                                  latency_allocation="uniform")
    assert report.latency_search


def test_a_binding_macs_budget_is_not_reported_as_unstable_measurements(caplog):
    model = _wide()
    with caplog.at_level("INFO", logger="kcp_plugin.deploy.search"):
        report = kcp_plugin.prune(model, X, "l2", target_latency_ratio=0.9,
                                  target_macs_ratio=0.4, latency_backend=_clock_backend())
    assert report.macs_ratio <= 0.42 and len(report.latency_model["trials"]) == 1
    assert "unstable" not in caplog.text and "MACs budget 0.400 bound first" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_macs_target_for_a_gpu_backend_prunes_on_a_machine_without_one():
    """Widths for the GPU (its multiple, 32) on a CPU-only machine; only the timing is
    skipped, with a warning."""
    torch.manual_seed(0)
    model = build_model("resnet20", width=128).eval()
    with pytest.warns(UserWarning, match="not timed on cuda.*rounded for that backend"):
        report = kcp_plugin.prune(model, X, "l2", target_macs_ratio=0.5,
                                  latency_backend=kcp_plugin.Backend("cuda", dtype="bf16"))
    assert report.round_to == 32 and report.latency_before_ms is None
    assert all(w % 32 == 0 for n, w in report.widths_after.items() if n != "fc")


def test_a_final_reading_off_the_search_is_measured_again_then_warned(monkeypatch):
    """Table allocation: when the measurement after the prune is off the target, it is taken
    twice more and the median of three is the figure: a lone outlier is absorbed; a gap that
    lasts is a UserWarning. The last entry of latency_search is the chosen budget (no NaN
    marker: reports are written as strict JSON)."""
    real, finish = search.compare_latency, search.TableAllocator.finish
    state = {"finishing": False, "calls": 0, "slow": 1}

    def compare(models, *args, **kwargs):
        stats = real(models, *args, **kwargs)
        if state["finishing"]:
            state["calls"] += 1
            if state["calls"] <= state["slow"]:  # the pruned model's reading, 1.6x too slow
                d, p = stats
                stats = [d, replace(p, median_ms=1.6 * p.median_ms)]
        return stats

    def finishing(self, model, report):
        state["finishing"] = True
        try:
            return finish(self, model, report)
        finally:
            state["finishing"] = False

    monkeypatch.setattr(search, "compare_latency", compare)
    monkeypatch.setattr(search.TableAllocator, "finish", finishing)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # one outlier: no warning
        report = kcp_plugin.prune(_wide(), X, "l2", target_latency_ratio=0.5,
                                  latency_backend=_clock_backend())
    assert state["calls"] == 3
    assert abs(report.latency_after_ms / report.latency_before_ms - 0.5) <= 0.025
    assert report.latency_search[-1][0] == report.latency_model["trials"][-1]["budget_ratio"] \
        or report.latency_search[-1][0] in [t["budget_ratio"] for t in
                                            report.latency_model["trials"]]
    assert all(v == v for v, *_ in report.latency_search)  # no NaN
    state.update(calls=0, slow=3)  # every reading slow: a warning
    with pytest.warns(UserWarning, match="measurements are unstable"):
        kcp_plugin.prune(_wide(), X, "l2", target_latency_ratio=0.5,
                         latency_backend=_clock_backend())
