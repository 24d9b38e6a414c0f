"""Distillation as a searched choice of the NNI pruning search (kcp_plugin.bench.nni_search):
the ``distill`` search-space entry, its checks, trials that distil from their dense model during
fine-tuning and report it, and the search tool's ``--distill*`` flags."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import kcp_plugin.distill as kd
from kcp_plugin.bench import nni_search as search
from kcp_plugin.distill import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
CHOICES = r"valid: none, or parts joined by '\+': kl, cwd, l1, mse \(an output loss"


def _choice(*values):
    return {"_type": "choice", "_value": list(values)}


@pytest.mark.parametrize("spec,message", [
    ("klx", rf"unknown distillation 'klx' in 'klx'; close matches: kl; {CHOICES}"),
    ("kl+featurs", r"unknown distillation 'featurs' in 'kl\+featurs'; close matches: features"),
    ("kl+cwd", r"two output losses \(kl, cwd\)"),
    ("kl+kl", "repeats a part"),
    (3, "distill must be a string"),
])
def test_bad_distill_values_are_named_with_the_valid_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        search.parse_distill(spec)
    with pytest.raises(ValueError, match=message):
        search.SearchSettings(distill=spec)
    with pytest.raises(ValueError, match=message):
        search.check_search_space({"distill": _choice("none", spec)}, "segmentation")


def test_distill_values_become_one_config_per_task():
    assert search.parse_distill("none") is None and search.parse_distill(" None ") is None
    assert search.parse_distill("Features+KL") == ("kl", True, False)
    assert search.SearchSettings(distill="dca+features+cwd").distill == "cwd+features+dca"
    assert search.distill_layers("segmentation") == ["head"]
    assert search.distill_layers("classification") == ["layer3"]
    assert search.distill_layers("stereo") == ["aggregate"]
    assert search.distill_config("none", "segmentation") is None
    assert search.distill_config("kl+features+dca", "segmentation", weight=2.0, steps=60) == \
        DistillConfig("kl", weight=2.0, layers=["head"], dca_layers=["head"], dca_batches=8,
                      num_classes=5)
    assert search.distill_config("dca", "classification", ["layer2"], steps=4) == \
        DistillConfig(None, dca_layers=["layer2"], dca_batches=1, num_classes=10)
    assert search.distill_config("l1", "stereo").output == "l1"


def test_search_space_distillation_is_checked_against_the_task():
    space = {"criterion": _choice("l2"), "distill": _choice("none", "kl", "cwd+features"),
             "distill_weight": {"_type": "uniform", "_value": [0.5, 2.0]}}
    search.check_search_space(space, "segmentation")
    cases = [
        ({"distill": {"_type": "uniform", "_value": [0, 1]}}, "segmentation",
         "'distill' must be a choice"),
        ({"distill": _choice("cwd")}, "classification", "'cwd' compares spatial maps"),
        ({"distill": _choice("l1+dca")}, "stereo", "'dca' needs class labels"),
        ({"distill": _choice("kl")}, "stereo", "'kl' compares class distributions"),
        ({"distill_weight": _choice(-1.0)}, "segmentation", "distill_weight must be a number "
         ">= 0"),
        ({"distill_temperature": {"_type": "uniform", "_value": [0.0, 2.0]}}, "segmentation",
         "distill_temperature must be a number > 0"),
    ]
    for bad, task, message in cases:
        with pytest.raises(ValueError, match=message):
            search.check_search_space(bad, task)
    # the experiment's layers are resolved on the task's model before anything runs
    settings = search.SearchSettings(distill="kl+features", distill_layers=["haed"])
    with pytest.raises(ValueError, match="distillation layer 'haed' does not exist.*head"):
        search.check_search_space({"target_macs": _choice(0.5)}, "segmentation", settings)
    settings.distill = "kl"  # no feature part: the layers are not used
    search.check_search_space({"target_macs": _choice(0.5)}, "segmentation", settings)
    with pytest.raises(ValueError, match="distill_layers must be a non-empty list"):
        search.SearchSettings(distill_layers=[])


def test_quick_trial_distils_from_its_dense_model_and_reports_it(tmp_path, monkeypatch):
    """A trial of the quick search's settings (its data, 60 fine-tuning steps, one thread),
    run as NNI starts it (trial_main, parameters as the tuner gives them): its fine-tuning
    distils from the dense checkpoint, frozen, and the result and the trial line say so."""
    settings = search.quick_settings(search.SearchSettings(criterion="l2"))
    search.train_dense(settings, 0, 3e-3, tmp_path / "dense.pt", progress=False)
    settings.dense = str(tmp_path / "dense.pt")
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(asdict(settings)))
    made = []

    class Recorded(kd.Distiller):
        def __init__(self, teacher, student, *args, **kwargs):
            made.append({k: v.clone() for k, v in teacher.state_dict().items()})
            super().__init__(teacher, student, *args, **kwargs)
            made.append(self)

    monkeypatch.setattr(kd, "Distiller", Recorded)
    monkeypatch.setenv("NNI_OUTPUT_DIR", str(tmp_path))
    params = {"target_macs": 0.5, "distill": "kl+features", "distill_weight": 0.5}
    result = search.trial_main(["--settings", str(path), "--params", json.dumps(params)])
    teacher_state, distiller = made
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(teacher_state[k], v) for k, v in dense.items())  # the dense model
    assert not distiller.teacher.training
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    assert distiller.config == DistillConfig("kl", weight=0.5, layers=["head"])
    assert not distiller._handles  # hooks removed after the fine-tuning
    assert result["distill"] == "kl+features" and result["distill_layers"] == ["head"]
    assert set(result["distill_loss"]) == {"out", "feat"}
    assert all(v > 0 for v in result["distill_loss"].values())
    assert len(result["history"]) == 2  # intermediate results at steps 20 and 40 of 60
    saved = json.loads((tmp_path / "trial.json").read_text())
    assert saved["params"] == params and saved["distill"] == "kl+features"
    row = {"trial": "Ab3xY", "number": 0, "status": "SUCCEEDED", "params": params,
           "final": result, "intermediate": [], "log": None, "duration_s": 12.0}
    line = search.format_trial(row, "miou", done=1, total=4)
    assert "distill=kl+features" in line and "distill_weight=0.5" in line
    # a distillation the experiment fixes (no distill parameter) is named in the line too
    fixed = dict(row, params={"target_macs": 0.5})
    assert "  distilled kl+features  " in search.format_trial(fixed, "miou")
    plain = dict(row, final=dict(result, distill="none"))
    assert "distilled" not in search.format_trial(dict(plain, params={}), "miou")


def test_trial_without_distillation_reports_none(tmp_path):
    settings = search.SearchSettings(n_train=16, n_val=8, batch_size=8, finetune_steps=2,
                                     report_every=1, threads=1)
    search.train_dense(settings, 0, 3e-3, tmp_path / "dense.pt", progress=False)
    settings.dense = str(tmp_path / "dense.pt")
    result = search.run_trial({"criterion": "l2", "target_macs": 0.5}, settings)
    assert result["distill"] == "none" and "distill_loss" not in result
    settings.distill = "cwd"  # the experiment's fixed choice, when the space has none
    result = search.run_trial({"criterion": "l2", "target_macs": 0.5}, settings)
    assert result["distill"] == "cwd" and set(result["distill_loss"]) == {"out"}
    with pytest.raises(ValueError, match="'cwd' compares spatial maps"):  # before any prune
        search.run_trial({"distill": "cwd"}, search.SearchSettings(task="classification"))


def _tool():
    spec = importlib.util.spec_from_file_location("_tool_nni_search_distill",
                                                  ROOT / "tools" / "nni_search.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_search_tool_distill_flags(monkeypatch, tmp_path, capsys):
    tool = _tool()
    calls = []

    def fake_run_search(space, settings, out, **kwargs):
        calls.append(settings)
        return [{"final": {"default": 1.0}}], "summary"

    monkeypatch.setattr(tool, "run_search", fake_run_search)
    assert tool.main(["--quick", "--distill", "kl+features", "--distill-layers", "layer4, head",
                      "--distill-weight", "0.5", "--distill-temperature", "2", "--out",
                      str(tmp_path)]) == 0
    settings = calls[-1]
    assert (settings.distill, settings.distill_layers, settings.distill_weight,
            settings.distill_temperature) == ("kl+features", ["layer4", "head"], 0.5, 2.0)
    assert tool.main(["--out", str(tmp_path)]) == 0
    assert calls[-1].distill == "none" and calls[-1].distill_layers is None
    count = len(calls)
    assert tool.main(["--distill", "kl+klx", "--out", str(tmp_path)]) == 2
    assert len(calls) == count
    assert "unknown distillation 'klx'" in capsys.readouterr().err


def test_experiment_searches_distillation_end_to_end(tmp_path):
    """A real NNI experiment (local mode, 2 trials at once) whose tuner chooses ``distill``:
    every trial distils what it was given and its line says so."""
    space = {"distill": _choice("none", "kl+features"), "target_macs": _choice(0.5)}
    settings = search.SearchSettings(task="segmentation", n_train=16, n_val=8, batch_size=8,
                                     finetune_steps=3, report_every=1, threads=1, criterion="l2")
    lines: list[str] = []
    rows, text = search.run_search(space, settings, tmp_path, dense_steps=2, config_path=None,
                                   max_trials=2, concurrency=2, timeout_s=600, progress=False,
                                   log=lines.append)
    assert len(rows) == 2 and all(r["status"] == "SUCCEEDED" for r in rows), rows
    assert any(line.startswith("distillation: the fine-tuning distils from the trial's dense "
                               "model, frozen: each trial's distill parameter (none, "
                               "kl+features)") for line in lines), lines
    trial_lines = [line for line in lines if line.startswith("[trial ")]
    for row in rows:
        chosen = row["params"]["distill"]
        assert row["final"]["distill"] == chosen
        assert ("distill_loss" in row["final"]) == (chosen != "none")
        (line,) = [t for t in trial_lines if f" {row['trial']} SUCCEEDED" in t]
        assert f"distill={chosen}" in line
    assert all(f"distill={r['params']['distill']}" in text for r in rows)  # summary.md
