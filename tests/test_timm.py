"""timm integration: the kcp_pruned entrypoint, checkpoints, ViT/Swin/MetaFormer/EdgeNeXt
pruning, refusals, training-time pruning through tools/timm_train.py, and a sweep subset."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import kcp_plugin
import kcp_plugin.integrations.timm as kt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message="Unwrapped parameters detected")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools",
                                                                               f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _x(side: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _macs(model: nn.Module, side: int = 32) -> int:
    return kcp_plugin.count_macs_params(model, _x(side, batch=1))[0]


@pytest.fixture(scope="module")
def pruned_resnet():
    torch.manual_seed(0)
    model = timm.create_model("kcp_pruned", base="resnet18", num_classes=5,
                              target_macs_ratio=0.5, input_size=32).eval()
    return model


# ---------------------------------------------------------------------- the entrypoint
def test_entrypoint_prunes_keeps_cfg_and_reset_classifier(pruned_resnet):
    dense = timm.create_model("resnet18", num_classes=5).eval()
    ratio = _macs(pruned_resnet) / _macs(dense)
    assert abs(ratio - 0.5) <= 0.02
    assert type(pruned_resnet) is type(dense)  # the timm class itself, only narrower
    # the base's data config is kept; only the architecture names the entrypoint
    cfg, base_cfg = pruned_resnet.pretrained_cfg, dense.pretrained_cfg
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "classifier",
                "first_conv"):
        assert cfg[key] == base_cfg[key], key
    assert cfg["architecture"] == "kcp_pruned"
    data = timm.data.resolve_data_config({}, model=pruned_resnet)
    assert data["mean"] == base_cfg["mean"] and data["input_size"] == base_cfg["input_size"]
    # head bookkeeping follows the pruned width, so reset_classifier builds a fitting head
    fc = pruned_resnet.get_classifier()
    assert fc.in_features < dense.num_features
    assert pruned_resnet.num_features == fc.in_features
    clone = copy.deepcopy(pruned_resnet)
    clone.reset_classifier(3)
    assert clone(_x()).shape == (2, 3)
    assert clone.get_classifier().in_features == fc.in_features


def test_checkpoint_path_reload_is_exact(pruned_resnet, tmp_path):
    x = _x()
    with torch.no_grad():
        expected = pruned_resnet(x)
    sd = pruned_resnet.state_dict()
    assert sd[kt.PLAN_KEY].dtype == torch.uint8  # the plan travels inside the state dict
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "kcp_pruned", "state_dict": sd}, path)  # train.py layout
    again = timm.create_model("kcp_pruned", base="resnet18", num_classes=5,
                              checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    # safetensors (what timm exports) carries it too
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file(sd, str(st))
    again = timm.create_model("kcp_pruned", base="resnet18", num_classes=5,
                              checkpoint_path=str(st)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    # a model pruned at creation with other settings is rebuilt to the checkpoint's plan
    other = timm.create_model("kcp_pruned", base="resnet18", num_classes=5,
                              pruning_ratio=0.2, input_size=32,
                              checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(other(x), expected)
    assert kcp_plugin.get_plan(other) == kcp_plugin.get_plan(pruned_resnet)


def test_plan_kwarg_from_save_pruned_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=4).eval()
    kt.prune_timm_model(model, "l2", pruning_ratio=0.4, input_size=32, progress=False)
    path = tmp_path / "pruned.pt"
    kcp_plugin.save_pruned(model, path)  # plan beside the state dict, not inside it
    rebuilt = timm.create_model("kcp_pruned", base="resnet18", num_classes=4, plan=str(path),
                                checkpoint_path=str(path)).eval()
    x = _x()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    json_path = tmp_path / "plan.json"
    json_path.write_text(json.dumps(kcp_plugin.get_plan(model)))
    assert kt.read_plan(str(json_path)) == kcp_plugin.get_plan(model)


@pytest.mark.parametrize("kwargs, match", [
    ({"base": "resnet_18"}, "close matches: resnet18"),
    ({"base": "kcp_pruned"}, "not kcp_pruned itself"),
    ({"target_macs_ratio": 0.5, "plan": {"format": "x"}}, "at most one of"),
    ({"target_macs_ratio": 1.5}, r"target_macs_ratio must be in \(0, 1\]"),
    ({"importance": "nope", "target_macs_ratio": 0.5}, "nope"),
    ({"importance": "taylor", "target_macs_ratio": 0.5}, "reads gradients"),
    ({"plan": "/nonexistent/plan.pt"}, "does not exist"),
    ({"prune_kwargs": {"dry_run": True}, "target_macs_ratio": 0.5}, "not accepted"),
    ({"target_latency_ratio": 0}, r"target_latency_ratio must be in \(0, 1\]"),
    ({"target_latency_ratio": 0.5, "pruning_ratio": 0.3}, "at most one of"),
    ({"target_latency_ratio": 0.5, "plan": {"format": "x"}}, "at most one of"),
    ({"target_latency_ratio": 0.5, "latency_backend": "tensorrt"},
     "unknown latency backend 'tensorrt'; valid: torch, onnxruntime, cuda"),
    ({"target_latency_ratio": 0.5, "latency_backend": {"name": "cuda", "dtype": "int8"}},
     "cannot run dtype 'int8'; valid: fp32, fp16, bf16"),
    ({"target_latency_ratio": 0.5, "latency_backend": {"nme": "cuda"}},
     "unknown field.*nme.*close matches: name"),
    ({"target_latency_ratio": 0.5, "latency_allocation": "greedy"},
     "unknown latency_allocation 'greedy'; valid: table, uniform"),
    ({"target_latency_ratio": 0.5, "target_macs_ratio": 0.4, "latency_allocation": "uniform"},
     "'table' only"),
    ({"target_latency_ratio": 0.5, "prune_kwargs": {"round_to": 8}},
     "round_to: latency_allocation='table' chooses"),
    ({"target_macs_ratio": 0.5, "prune_kwargs": {"latency_backend": "torch"}},
     "latency_backend cannot be set in prune_kwargs: give .* as kcp_pruned's own"),
    ({"latency_backend": "torch"}, "latency_backend applies when the model is pruned"),
    ({"target_latency_ratio": 0.5, "importance": "taylor"}, "reads gradients"),
])
def test_entrypoint_rejects_bad_arguments(kwargs, match):
    kwargs.setdefault("base", "resnet18")
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        timm.create_model("kcp_pruned", **kwargs)


def test_dense_entrypoint_explains_missing_plan(pruned_resnet, tmp_path):
    sd = {k: v for k, v in pruned_resnet.state_dict().items() if k != kt.PLAN_KEY}
    path = tmp_path / "no_plan.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        timm.create_model("kcp_pruned", base="resnet18", num_classes=5,
                          checkpoint_path=str(path))


# pytorch-image-models' own scripts (Apache-2.0, see tests/timm_scripts/README.md): timm's pip
# package does not ship them, so the documented commands are tested against these copies.
TIMM_SCRIPTS = os.path.join(ROOT, "tests", "timm_scripts")
SUBPROCESS_ENV = {
    **os.environ, "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
}


def _run(argv: list[str], timeout: int = 300):
    import subprocess

    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env=SUBPROCESS_ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_validate_script_runs_through_the_runner(pruned_resnet, image_folder, tmp_path):
    """timm's validate.py has no --device-modules: the documented runner registers kcp_pruned
    and runs the real script unchanged, which rebuilds the pruned model from its checkpoint."""
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": pruned_resnet.state_dict()}, ckpt)
    results = tmp_path / "results.json"
    out = _run([sys.executable, "-m", "kcp_plugin.integrations.timm.run",
                os.path.join(TIMM_SCRIPTS, "validate.py"), str(image_folder), "--model",
                "kcp_pruned", "--model-kwargs", "base=resnet18", "--num-classes", "5",
                "--checkpoint", str(ckpt), "--input-size", "3", "16", "16", "-b", "2", "-j",
                "0", "--device", "cpu", "--results-file", str(results), "--results-format",
                "json"])
    params = sum(t.numel() for t in pruned_resnet.parameters())
    assert f"Model kcp_pruned created, param count: {params}" in out.stdout + out.stderr
    assert json.loads(results.read_text())["param_count"] == round(params / 1e6, 2)
    bad = __import__("subprocess").run(
        [sys.executable, "-m", "kcp_plugin.integrations.timm.run", "nope.py"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "'nope.py' is not a file" in bad.stderr


def test_plan_that_is_not_a_checkpoint_is_named_so(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(256)) * 2)
    with pytest.raises(ValueError, match="garbage.pth is not a checkpoint or plan file") as info:
        timm.create_model("kcp_pruned", base="resnet18", num_classes=5, plan=str(path))
    assert "weights_only" not in str(info.value)
    # timm loads checkpoint_path itself, after the entrypoint: the file is checked first
    with pytest.raises(ValueError, match="garbage.pth is not a timm / kcp_plugin checkpoint: "
                       "its bytes are not a torch checkpoint") as info:
        timm.create_model("kcp_pruned", base="resnet18", num_classes=5,
                          checkpoint_path=str(path))
    assert "weights_only" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="checkpoint_path .*missing.pth does not exist"):
        timm.create_model("kcp_pruned", base="resnet18", checkpoint_path=str(tmp_path /
                                                                             "missing.pth"))


# ---------------------------------------------------------------------- attention models
def test_vit_heads_stay_consistent_and_reload(tmp_path):
    torch.manual_seed(0)
    kw = dict(base="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    model = timm.create_model("kcp_pruned", target_macs_ratio=0.5, **kw,
                              prune_kwargs={"prune_num_heads": True,
                                            "head_pruning_ratio": 0.34}).eval()
    x = _x(32)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              num_classes=5)
    assert abs(_macs(model) / _macs(dense) - 0.5) <= 0.02
    for blk in model.blocks:
        attn = blk.attn
        assert attn.num_heads < 3  # whole heads removed (of 3)
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
        assert attn.proj.in_features == attn.num_heads * attn.head_dim
        assert attn.scale == pytest.approx(attn.head_dim ** -0.5)
    assert model.embed_dim == model.num_features == model.head.in_features < dense.embed_dim
    kt.check_reset_classifier(model, x)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    again = timm.create_model("kcp_pruned", checkpoint_path=str(path), **kw).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def _swin_small(**extra):
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2,
                             depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 2, 3, 6),
                             num_classes=5, **extra).eval()


def _metaformer_small():
    from timm.models.metaformer import GroupNorm1NoBias, MetaFormer

    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), norm_layers=GroupNorm1NoBias,
                      use_mlp_head=False, num_classes=5).eval()


def _edgenext_small():
    return timm.create_model("edgenext_xx_small", depths=(1, 1, 2, 1), num_classes=5).eval()


@pytest.mark.parametrize("build", [_swin_small, _metaformer_small, _edgenext_small],
                         ids=["swin-patchmerging", "metaformer-scale-nobiasnorm",
                              "edgenext-protected"])
def test_custom_pruners_prune_and_replay(build):
    torch.manual_seed(0)
    model, x = build(), _x(32)
    reference = copy.deepcopy(model)
    report = kt.prune_timm_model(model, "kcp", example_inputs=x, target_macs_ratio=0.6,
                                 progress=False)
    assert abs(report.macs_ratio - 0.6) <= 0.02
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    kt.check_reset_classifier(model, x)
    kt.apply_timm_plan(reference, kcp_plugin.get_plan(model), x)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(reference.eval()(x), out)


def test_swin_patch_merging_keeps_four_copies_aligned():
    torch.manual_seed(0)
    model, x = _swin_small(), _x(32)
    merge = model.layers[1].downsample
    kept_norm = merge.norm.weight.detach().clone()
    kt.prune_timm_model(model, "l2", example_inputs=x, pruning_ratio=0.5, progress=False)
    dim = merge.dim
    assert merge.norm.weight.shape[0] == merge.reduction.in_features == 4 * dim
    # the four merged copies of each kept channel keep the same channel order
    w = merge.norm.weight.detach().reshape(4, dim)
    orig = kept_norm.reshape(4, -1)
    for k in range(4):
        assert all(any(torch.equal(w[k, j], v) for v in orig[k]) for j in range(dim))


def test_unsupported_architecture_refused_untouched(monkeypatch):
    # no timm class is refused today (support.REFUSED is empty); one put there is refused by
    # the integration and the kcp_pruned entry point, before the model is touched
    monkeypatch.setitem(kt.support.REFUSED, "timm.models.davit.WindowAttention",
                        "it reshapes qkv by the input width (test)")
    model = timm.create_model("davit_tiny", num_classes=5).eval()
    params = [p for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(kt.UnsupportedModelError, match="WindowAttention"):
        kt.prune_timm_model(model, "kcp", target_macs_ratio=0.5, input_size=32)
    assert [p for p in model.parameters()] == params
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(kt.UnsupportedModelError, match="reshapes qkv by the input width"):
        timm.create_model("kcp_pruned", base="davit_tiny", target_macs_ratio=0.5)


# ---------------------------------------------------------------------- training-time pruning
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two colour classes of noisy 16x16 images, train and validation splits."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("validation", 2)):
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (16, 16, 3)),
                              0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_timm_train_wrapper_prunes_iteratively_and_resumes(image_folder, tmp_path):
    tool = _tool("timm_train")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        "model: resnet18\nnum_classes: 2\ninput_size: [3, 16, 16]\nbatch_size: 4\n"
        "opt: sgd\nlr: 0.01\nsched: cosine\nwarmup_epochs: 0\nepochs: 2\nworkers: 0\n"
        "model_ema: true\nlog_interval: 100\n"
        "kcp_importance: kcp\nkcp_target_macs: 0.5\nkcp_num_prunes: 2\nkcp_start: 1\n"
        "kcp_every: 1\n"
    )
    out = tmp_path / "run"
    summary = tool.run_builtin([str(image_folder), "--config", str(cfg), "--output", str(out),
                                "--max-steps", "3"])
    assert summary["pruned_at_steps"] == [1, 2]
    assert abs(summary["macs_ratio"] - 0.5) <= 0.02  # measured on the live model
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    # EMA copy pruned alike, its averages kept: it reloads into the same pruned structure
    again = timm.create_model("kcp_pruned", base="resnet18", num_classes=2,
                              checkpoint_path=summary["checkpoint"]).eval()  # uses the EMA
    ema_sd = ckpt["state_dict_ema"]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ema_sd.items()
               if k != kt.PLAN_KEY)
    assert abs(_macs(again, 16) / summary["macs_dense"] - summary["macs_ratio"]) < 1e-9
    # resume: the pruned structure is rebuilt from the checkpoint, the schedule is finished
    resumed = tool.run_builtin([str(image_folder), "--config", str(cfg), "--output", str(out),
                                "--resume", summary["checkpoint"], "--max-steps", "5"])
    assert resumed["pruned_at_steps"] == [] and resumed["steps"] == 5
    assert resumed["macs"] == summary["macs"]


def test_timm_train_builtin_loop_follows_timms_conventions(image_folder, tmp_path, caplog):
    """As timm's train.py: --device-modules, a `val/` folder found for --val-split validation,
    outputs in <output>/<experiment> with args.yaml, summary.csv, last / model_best; and the
    dense baseline of a model pruned at creation is its base architecture."""
    import shutil

    tool = _tool("timm_train")
    data = tmp_path / "data"
    shutil.copytree(image_folder / "train", data / "train")
    shutil.copytree(image_folder / "validation", data / "val")  # timm's other spelling
    argv = [str(data), "--device-modules", "kcp_plugin.integrations.timm", "--model",
            "kcp_pruned", "--model-kwargs", "base=resnet18", "target_macs_ratio=0.5",
            "input_size=16", "--num-classes", "2", "--input-size", "3", "16", "16",
            "--batch-size", "4", "--lr", "0.01", "--epochs", "1", "--workers", "0",
            "--output", str(tmp_path / "out"), "--experiment", "exp", "--max-steps", "2"]
    summary = tool.run_builtin(argv)
    assert summary["top1"] is not None  # validated on val/
    assert abs(summary["macs_ratio"] - 0.5) <= 0.02  # not 1.0: the baseline is dense resnet18
    run = tmp_path / "out" / "exp"
    assert summary["output"] == str(run)
    assert {"args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar",
            "kcp_summary.json"} <= {p.name for p in run.iterdir()}
    assert "top1" in (run / "summary.csv").read_text().splitlines()[0]
    shutil.rmtree(data / "val")
    with caplog.at_level("WARNING"):
        summary = tool.run_builtin(argv)
    assert summary["top1"] is None and "no validation folder" in caplog.text


@pytest.mark.parametrize("importance", ["fisher", "taylor", "hessian"])
def test_timm_train_builtin_loop_feeds_gradient_and_data_criteria(image_folder, tmp_path,
                                                                  monkeypatch, importance):
    """The built-in loop keeps the last training batches: fisher collects on them at each
    pruning point, taylor / hessian take the gradients of the latest one."""
    import kcp_plugin.pruning

    tool = _tool("timm_train")
    seen = []
    real_prune = kcp_plugin.pruning.prune

    def spy(model, example_inputs, importance, **kwargs):
        data = kwargs.get("data")
        seen.append((len(list(data)) if data is not None else 0,
                     kwargs.get("loss_fn") is not None))
        return real_prune(model, example_inputs, importance, **kwargs)

    monkeypatch.setattr(kcp_plugin.schedule, "prune", spy)
    summary = tool.run_builtin([
        str(image_folder), "--model", "resnet18", "--num-classes", "2", "--input-size", "3",
        "16", "16", "--batch-size", "4", "--opt", "sgd", "--lr", "0.01", "--epochs", "1",
        "--workers", "0", "--output", str(tmp_path / "run"), "--max-steps", "3",
        "--kcp-importance", importance, "--kcp-target-macs", "0.5", "--kcp-num-prunes", "2",
        "--kcp-start", "1", "--kcp-every", "1", "--kcp-data-steps", "2"])
    assert summary["pruned_at_steps"] == [1, 2]
    assert abs(summary["macs_ratio"] - 0.5) <= 0.02
    if importance == "fisher":  # the point after step k sees batches k-1 and k
        assert seen == [(2, False), (2, False)]
    else:
        assert seen == [(0, True), (0, True)]


def test_timm_train_refuses_bad_pruning_options_before_training(tmp_path):
    tool = _tool("timm_train")
    with pytest.raises(SystemExit, match="kcp-importance.*nope"):
        tool.parse_kcp(["--kcp-importance", "nope"])
    with pytest.raises(SystemExit, match="kcp-data-steps"):
        tool.parse_kcp(["--kcp-data-steps", "0"])
    script = tmp_path / "train.py"
    script.write_text("raise RuntimeError('must not run')\n")
    kcp, rest = tool.parse_kcp(["--kcp-importance", "fisher", "--kcp-target-macs", "0.5"])
    with pytest.raises(SystemExit, match="built-in loop.*data-free criterion: .*kcp"):
        tool.run_train_script(str(script), kcp, rest)


@pytest.mark.parametrize("name", ["resnet50_kcp", "deit_small_kcp", "resnet18_kcp_smoke"])
def test_recipes_parse(name, tmp_path):
    tool = _tool("timm_train")
    path = os.path.join(ROOT, "configs", "timm", f"{name}.yaml")
    args = tool.parse_builtin([str(tmp_path), "--config", path])
    kcp, _ = tool.parse_kcp(["--config", path])
    assert kcp.kcp_target_macs == args.kcp_target_macs and 0 < kcp.kcp_target_macs < 1
    assert timm.is_model(args.model)
    # flags override the YAML
    kcp, _ = tool.parse_kcp(["--config", path, "--kcp-target-macs", "0.3"])
    assert kcp.kcp_target_macs == 0.3


_TRAIN_ARGS = ["--num-classes", "2", "--input-size", "3", "16", "16", "-b", "4", "--lr",
               "0.01", "--epochs", "1", "--warmup-epochs", "0", "-j", "0", "--device", "cpu",
               "--log-interval", "1"]


def test_timm_train_wrapper_drives_timms_train_script(image_folder, tmp_path):
    """The documented command on timm's real train.py: pruning points logged once each through
    timm's logger, checkpoints in timm's layout that reload pruned."""
    out = _run([sys.executable, os.path.join(ROOT, "tools", "timm_train.py"), "--train-script",
                os.path.join(TIMM_SCRIPTS, "train.py"), str(image_folder), "--model", "resnet18",
                *_TRAIN_ARGS, "--output", str(tmp_path), "--experiment", "run", "--model-ema",
                "--kcp-target-macs", "0.5", "--kcp-num-prunes", "2", "--kcp-start", "1",
                "--kcp-every", "1"])
    log = (out.stdout + out.stderr).splitlines()
    points = [line for line in log if line.startswith("kcp_plugin: pruning point")]
    assert [p.split(" at ")[0] for p in points] == ["kcp_plugin: pruning point 1/2",
                                                    "kcp_plugin: pruning point 2/2"], points
    assert sum(line.startswith("Train: 0 [   0/") for line in log) == 1  # not printed twice
    run = tmp_path / "run"
    assert {"model_best.pth.tar", "last.pth.tar", "summary.csv", "args.yaml"} <= \
        {p.name for p in run.iterdir()}
    model = timm.create_model("kcp_pruned", base="resnet18", num_classes=2,
                              checkpoint_path=str(run / "model_best.pth.tar")).eval()
    dense = timm.create_model("resnet18", num_classes=2)
    assert abs(_macs(model, 16) / _macs(dense, 16) - 0.5) <= 0.02


def test_train_script_with_device_modules_prunes_at_creation(image_folder, tmp_path):
    """docs/timm.md's train.py command: --device-modules registers kcp_pruned."""
    _run([sys.executable, os.path.join(TIMM_SCRIPTS, "train.py"), str(image_folder),
          "--device-modules", "kcp_plugin.integrations.timm", "--model", "kcp_pruned",
          "--model-kwargs", "base=resnet18", "target_macs_ratio=0.5", "input_size=16",
          *_TRAIN_ARGS, "--output", str(tmp_path), "--experiment", "run"])
    model = timm.create_model("kcp_pruned", base="resnet18", num_classes=2,
                              checkpoint_path=str(tmp_path / "run" / "last.pth.tar")).eval()
    dense = timm.create_model("resnet18", num_classes=2)
    assert abs(_macs(model, 16) / _macs(dense, 16) - 0.5) <= 0.02


def _torchrun(*args: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(port),
          os.path.join(ROOT, "tests", "timm_ddp.py"), *args], timeout=600)


@pytest.mark.parametrize("run", ["script", "loop"])
def test_training_time_pruning_under_ddp(run, image_folder, tmp_path):
    """torchrun, 2 processes (gloo, CPU): every rank prunes at the same steps to the same plan,
    the DDP wrapper holds the pruned parameters, and training stays in sync afterwards (ranks
    see different data: equal final weights need gradients all-reduced through the re-made
    wrapper). ``script``: timm's real train.py; ``loop``: an own loop with ``taylor``, whose
    scores come from each rank's gradients (averaged over the ranks first)."""
    _torchrun(run, str(tmp_path), *([str(image_folder)] if run == "script" else []))
    ranks = [json.loads((tmp_path / f"{run}_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["plan"]["history"], "nothing was pruned"
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["pruned_at"] == ranks[1]["pruned_at"] == ([1, 2] if run == "script"
                                                              else [1, 3])
    assert ranks[0]["macs"] == ranks[1]["macs"]
    assert all(r["wrapper_holds_model_params"] for r in ranks)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    if run == "script":  # rank 0's checkpoint reloads pruned
        model = timm.create_model("kcp_pruned", base="resnet18", num_classes=2,
                                  checkpoint_path=str(tmp_path / "out" / "ddp" / "last.pth.tar"))
        assert _macs(model, 16) == ranks[0]["macs"]


# ---------------------------------------------------------------------- sweep subset
def test_sweep_subset(tmp_path, monkeypatch):
    monkeypatch.setitem(kt.support.REFUSED, "timm.models.davit.WindowAttention",
                        "a refusal for this test (the table is empty today)")
    sweep = _tool("sweep_models")
    js, md = tmp_path / "s.json", tmp_path / "s.md"
    code = sweep.main(["--timm-registry", "resnet18,davit_tiny", "--criteria", "kcp",
                       "--threads", "2", "--json", str(js), "--markdown", str(md)])
    result = json.loads(js.read_text())
    rows = {(e["model"], r["criterion"]): r for e in result["results"] for r in e["rows"]}
    assert rows["timm:resnet18", "tp"]["ok"] and rows["timm:resnet18", "kcp"]["ok"]
    assert rows["timm:resnet18", "kcp"]["roundtrip_ok"] and rows["timm:resnet18", "kcp"][
        "reset_ok"]
    assert not rows["timm:davit_tiny", "tp"]["ok"]
    assert rows["timm:davit_tiny", "kcp"]["error"]["type"] == "UnsupportedModelError"
    assert code == 1  # DaVit is refused
    text = md.read_text()
    assert "| timm:davit_tiny | 64 | kcp | refused |" in text
    assert "| timm:resnet18 | 64 | kcp | ok |" in text
    assert "torch-pruning alone handles 1 models; kcp_plugin fails on 0 of them" in text


# ------------------------------------------------ sweep: smp / transformers / Ultralytics specs
EXTRA_MODULES = ("segmentation_models_pytorch", "transformers", "ultralytics")


@pytest.fixture
def no_extras(monkeypatch):
    """The sweep tool with none of its extra libraries importable (None in sys.modules makes
    ``import`` raise ImportError), the environment and sys.path restored afterwards."""
    for module in EXTRA_MODULES:
        monkeypatch.setitem(sys.modules, module, None)
    for var in ("YOLO_OFFLINE", "YOLO_VERBOSE", "YOLO_CONFIG_DIR"):
        monkeypatch.setenv(var, "unset-by-test")
    monkeypatch.setattr(sys, "path", list(sys.path))
    sweep = _tool("sweep_models")
    # their distributions too (smp is in the test extras, so its metadata is installed)
    hidden = {r.split("==")[0] for lib in sweep.EXTRA_LIBRARIES.values() for r in lib.packages}
    real = sweep._dist_version
    monkeypatch.setattr(sweep, "_dist_version",
                        lambda req: None if req.split("==")[0] in hidden else real(req))
    return sweep


@pytest.mark.parametrize("spec, module", [
    ("smp:FPN/mobilenet_v2", "segmentation_models_pytorch"),
    ("hf:ViTForImageClassification", "transformers"),
    ("yolo:yolov8n.yaml", "ultralytics"),
])
def test_sweep_extra_spec_without_its_library(no_extras, spec, module):
    """A spec whose library is missing is a clear ModelSpecError naming the library and the
    sweep's --install-extras step, not an ImportError."""
    with pytest.raises(kcp_plugin.zoo.ModelSpecError, match="--install-extras") as err:
        no_extras.build_model({"spec": spec, "kwargs": {}})
    assert module in str(err.value) and "not installed" in str(err.value)


@pytest.mark.parametrize("spec, form", [
    ("smp:FPN", "smp:ARCH/ENCODER"), ("smp:/resnet18", "smp:ARCH/ENCODER"),
    ("smp:FPN/a/b", "smp:ARCH/ENCODER"), ("hf:vit base", "hf:CLASS"),
    ("yolo:yolov8n.pt", "packaged model YAML"), ("yolo:", "packaged model YAML"),
])
def test_sweep_extra_spec_form_checked_before_import(no_extras, spec, form):
    with pytest.raises(kcp_plugin.zoo.ModelSpecError, match=form.replace("/", ".")):
        no_extras.build_model({"spec": spec, "kwargs": {}})


def test_sweep_extra_specs_parse_and_select_outputs(no_extras):
    sweep = no_extras
    assert sweep.split_extra_spec("smp:DeepLabV3Plus/tu-convnext_atto") == (
        "smp", ("DeepLabV3Plus", "tu-convnext_atto"))
    assert sweep.split_extra_spec("hf:DetrForObjectDetection") == (
        "hf", ("DetrForObjectDetection",))
    assert sweep.extra_source("timm:resnet18") is None
    assert sweep.forward_fn_for("smp:FPN/resnet18") is None
    assert sweep.forward_fn_for("timm:resnet18") is None

    class Detr(nn.Module):  # a ModelOutput is a dict: logits and boxes kept, the rest not
        def forward(self, pixel_values):
            return {"logits": pixel_values[:, :2], "pred_boxes": pixel_values[:, 2:],
                    "last_hidden_state": pixel_values, "pred_masks": None}

    class Yolo(nn.Module):  # eval mode: (predictions, feature maps)
        def forward(self, x):
            return x * 2, [x, x]

    x = torch.randn(1, 3, 4, 4)
    logits, boxes = sweep.forward_fn_for("hf:DetrForObjectDetection")(Detr(), x)
    assert torch.equal(logits, x[:, :2]) and torch.equal(boxes, x[:, 2:])
    assert torch.equal(sweep.forward_fn_for("yolo:yolov8n.yaml")(Yolo(), x), x * 2)
    entries = sweep.extra_registry_entries("hf,yolo:rtdetr-l.yaml")
    assert {e["spec"] for e in entries} >= {"hf:ViTForImageClassification",
                                            "yolo:rtdetr-l.yaml"}
    assert not any(e["spec"].startswith("smp:") for e in entries)
    with pytest.raises(SystemExit, match="unknown nope"):
        sweep.extra_registry_entries("nope")


def test_sweep_install_extras_builds_the_pip_command(no_extras, tmp_path, capsys, monkeypatch):
    """--install-extras pip-installs (mocked: nothing is installed) only what the selected
    specs need, pinned, --no-deps, into DIR, then puts DIR first on sys.path; Ultralytics'
    AGPL notice is printed when it is installed. The models that cannot be built (their
    libraries are still missing) are rows 'not built', not crashes."""
    sweep = no_extras
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, check: calls.append((cmd, check)))
    target, js = tmp_path / "extras", tmp_path / "s.json"
    code = sweep.main(["--registry", "smp:FPN/resnet18,hf:ViTForImageClassification",
                       "--install-extras", str(target), "--criteria", "kcp",
                       "--json", str(js)])
    assert calls == [([sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade",
                       "--target", str(target), *sweep.EXTRA_LIBRARIES["smp"].packages,
                       *sweep.EXTRA_LIBRARIES["hf"].packages], True)]
    assert all("==" in p for p in calls[0][0][8:])  # pinned
    assert not any("ultralytics" in p for p in calls[0][0])
    assert sys.path[0] == str(target)
    assert "AGPL" not in capsys.readouterr().err
    result = json.loads(js.read_text())
    assert [e["error"]["type"] for e in result["results"]] == ["ModelSpecError"] * 2
    assert code == 1
    md = sweep.markdown(result)
    assert ("| hf:ViTForImageClassification (patch 8, hidden 96, 4 layers x 4 heads) | 64 | - "
            "| **not built**: ModelSpecError |") in md
    assert "segmentation_models_pytorch not installed" in md
    assert "(not built: 2)" in md and "* smp: not built 1" in md

    calls.clear()
    cmd = sweep.install_extras(str(target), ["yolo"], run=lambda c, check: calls.append(c))
    assert cmd == calls[0] and cmd[-1] == sweep.EXTRA_LIBRARIES["yolo"].packages[-1]
    assert "AGPL-3.0" in capsys.readouterr().err
    assert sweep.install_extras(str(target), [], run=lambda c, check: calls.append(c)) is None
    assert len(calls) == 1


def test_ghostnet_reaches_the_target_although_macs_are_not_monotonic():
    """GhostNet's sliced concat makes the largest channel ratio keep more MACs than smaller
    ones; the MACs search finds a bracket at coarser ratios instead of giving up."""
    from kcp_plugin.integrations.timm.pruning import prune_timm_model

    model = timm.create_model("ghostnet_050")
    x = torch.randn(1, 3, 64, 64)
    report = prune_timm_model(model, "kcp", example_inputs=x, target_macs_ratio=0.5,
                              progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_resnest_split_attention_is_left_to_the_safety_net():
    """ResNeSt's radix reshape breaks when the grouped conv before it is pruned with some
    channel choices: no per-class protection any more; the core's safety net finds the groups
    that break (with the criterion actually used) and the model reaches half its MACs."""
    from kcp_plugin.integrations.timm.support import check_supported, pruning_setup

    model = timm.create_model("resnest14d", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    check_supported(model)  # no UnsupportedModelError
    assert pruning_setup(model, x)["ignored_layers"] == []  # nothing protected by class
    report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert abs(report.macs_ratio - 0.5) <= 0.02 and model(x).shape == (1, 7)


# ---------------------------------------------------------------------- latency targets
def _clock(**settings) -> kcp_plugin.Backend:
    """A deterministic stand-in for the latency clock (tests/fake_clock.py): no timing, no
    GPU; the latency tables, allocation and verification run as on a real backend."""
    from fake_clock import CostClock

    return kcp_plugin.Backend(timer=CostClock(), runs=3, **settings)


def _latency_kept(model: nn.Module, side: int = 32, **dense_kwargs) -> float:
    dense = timm.create_model("resnet18", **dense_kwargs).eval()
    d, p = kcp_plugin.compare_latency([dense, model], _x(side, batch=1), backend=_clock())
    return p.median_ms / d.median_ms


def test_entrypoint_prunes_to_a_latency_target(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("kcp_pruned", base="resnet18", num_classes=5, input_size=32,
                              target_latency_ratio=0.6, latency_backend=_clock()).eval()
    assert abs(_latency_kept(model, num_classes=5) - 0.6) <= 0.03
    assert model.get_classifier().out_features == 5
    # a latency target with a MACs cap: both fractions kept at most
    capped = timm.create_model("kcp_pruned", base="resnet18", num_classes=5, input_size=32,
                               target_latency_ratio=0.9, target_macs_ratio=0.5,
                               latency_backend=_clock())
    assert _macs(capped) / _macs(timm.create_model("resnet18", num_classes=5)) <= 0.52
    # the plan travels in the state dict as for a MACs target
    path = tmp_path / "lat.pth"
    torch.save(model.state_dict(), path)
    again = timm.create_model("kcp_pruned", base="resnet18", num_classes=5,
                              checkpoint_path=str(path)).eval()
    assert torch.equal(again(_x()), model(_x()))


def test_entrypoint_refuses_a_gpu_backend_without_a_gpu_before_building(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or None,
                        raising=True)
    from kcp_plugin.integrations.timm import entrypoints

    with pytest.raises(ValueError, match="kcp_pruned: latency backend 'cuda' needs an NVIDIA"):
        entrypoints.kcp_pruned(base="resnet18", target_latency_ratio=0.5,
                               latency_backend={"name": "cuda", "dtype": "bf16", "batch": 64})
    assert not built


def _latency_schedule(model, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return kt.TimmPruningSchedule(model, opt, "l1", example_inputs=_x(32, batch=1),
                                  target_latency_ratio=0.6, latency_backend=_clock(),
                                  num_prunes=2, every=1, **kwargs)


def test_training_schedule_reaches_a_latency_target_at_its_last_point(caplog, monkeypatch):
    """The first point follows the MACs ramp (to 0.6 read as MACs), the last prunes to 0.6 of
    the dense latency; a schedule resumed between the points (model rebuilt from the
    checkpoint's plan) takes its dense reference from a fresh build of the base."""
    import logging

    import kcp_plugin.schedule

    calls = []
    real = kcp_plugin.schedule.prune

    def spy(model, x, importance, **kwargs):
        calls.append(kwargs.get("target_latency_ratio"))
        return real(model, x, importance, **kwargs)

    monkeypatch.setattr(kcp_plugin.schedule, "prune", spy)  # the core drives every point
    torch.manual_seed(0)
    model = timm.create_model("kcp_pruned", base="resnet18", num_classes=5)
    sched = _latency_schedule(model)
    dense_macs = _macs(model)
    assert sched.step()
    assert abs(_macs(model) / dense_macs - 0.8) <= 0.05  # the MACs ramp's first point
    state, weights = sched.state_dict(), copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger="train"):
        assert sched.step()
    kept = _latency_kept(model, num_classes=5)
    assert abs(kept - 0.6) <= 0.03 and sched.latency["ratio"] == pytest.approx(kept)
    assert calls[0] is None  # the MACs point
    assert len(calls) == 2 and 0.6 < calls[1] < 1.0  # the rest of the way, relative
    assert any("latency target at optimizer step 1" in r.getMessage() for r in caplog.records)
    assert sched.finished and sched.state_dict()["latency"] == sched.latency

    resumed = timm.create_model("kcp_pruned", base="resnet18", num_classes=5)
    resumed.load_state_dict(weights)  # the plan of the first point is replayed first
    again = _latency_schedule(resumed)
    again.load_state_dict(state)
    assert again.step()
    assert kcp_plugin.get_plan(resumed) == kcp_plugin.get_plan(model)


def test_an_unreachable_latency_point_is_named_in_the_users_terms():
    """The last point's latency target is relative to the model the earlier points left; its
    refusal names the user's target of the dense model and what the earlier points kept."""
    from fake_clock import CostClock

    model = timm.create_model("kcp_pruned", base="resnet18", num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = kt.TimmPruningSchedule(  # the clock's latency is nearly all per-pass overhead
        model, opt, "l1", example_inputs=_x(32, batch=1), target_latency_ratio=0.6,
        latency_backend=kcp_plugin.Backend(timer=CostClock(overhead_ms=1e4), runs=3),
        num_prunes=2, every=1)
    assert sched.step()
    with pytest.raises(kcp_plugin.TargetUnreachable,
                       match=r"target_latency_ratio=0.6 of the dense model: the earlier pruning "
                             r"points kept 0\.9\d+ of its latency, so the last point needed "
                             r"0\.6\d+ of the model as it was then, and: .*out of reach"):
        sched.step()


def test_training_schedule_refuses_bad_latency_settings():
    model = timm.create_model("resnet18", num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="TimmPruningSchedule: latency_backend cannot be set"):
        kt.TimmPruningSchedule(model, opt, target_macs_ratio=0.5,
                               prune_kwargs={"latency_backend": "torch"})
    with pytest.raises(ValueError, match=r"target_latency_ratio must be in \(0, 1\]"):
        kt.TimmPruningSchedule(model, opt, target_latency_ratio=2.0)
    kcp_plugin.prune(model, _x(32, batch=1), "l1", pruning_ratio=0.3)
    with pytest.raises(ValueError, match="does not record its base architecture"):
        kt.TimmPruningSchedule(model, opt, target_latency_ratio=0.5, latency_backend=_clock())


def test_timm_train_builtin_loop_prunes_to_a_latency_target(image_folder, tmp_path,
                                                            monkeypatch):
    """--kcp-target-latency and --kcp-latency-* reach the schedule (a stand-in clock put in
    the parsed backend: deterministic, no timing)."""
    import dataclasses

    tool = _tool("timm_train")
    parsed = []
    real = tool.latency_backend

    def with_clock(kcp):
        backend = real(kcp)
        parsed.append(backend)
        return dataclasses.replace(backend, timer=_clock().timer)

    monkeypatch.setattr(tool, "latency_backend", with_clock)
    summary = tool.run_builtin([
        str(image_folder), "--model", "resnet18", "--num-classes", "2", "--input-size", "3",
        "16", "16", "--batch-size", "4", "--opt", "sgd", "--lr", "0.01", "--epochs", "1",
        "--workers", "0", "--output", str(tmp_path / "run"), "--max-steps", "3",
        "--kcp-target-latency", "0.6", "--kcp-latency-backend", "torch",
        "--kcp-latency-batch", "4", "--kcp-latency-runs", "3", "--kcp-num-prunes", "2",
        "--kcp-start", "1", "--kcp-every", "1"])
    assert parsed[0] == kcp_plugin.Backend("torch", batch=4, runs=3)
    assert summary["pruned_at_steps"] == [1, 2]
    assert abs(summary["latency"]["ratio"] - 0.6) <= 0.03, summary["latency"]
    assert "batch 4" in summary["latency"]["setting"]


def test_timm_train_script_route_prunes_to_a_latency_target(image_folder, tmp_path):
    """timm's real train.py under the wrapper (in this process, so that the parsed backend
    can be given the stand-in clock): the last pruning point is the latency point."""
    import dataclasses

    tool = _tool("timm_train")
    kcp, rest = tool.parse_kcp([
        str(image_folder), "--model", "resnet18", *_TRAIN_ARGS, "--output", str(tmp_path),
        "--experiment", "run", "--kcp-target-latency", "0.6", "--kcp-latency-runs", "3",
        "--kcp-num-prunes", "2", "--kcp-start", "1", "--kcp-every", "1"])
    assert kcp.kcp_latency == kcp_plugin.Backend(runs=3)
    kcp.kcp_latency = dataclasses.replace(kcp.kcp_latency, timer=_clock().timer)
    schedule = tool.run_train_script(os.path.join(TIMM_SCRIPTS, "train.py"), kcp, rest)
    assert schedule.pruned_at == [1, 2]
    assert abs(schedule.latency["ratio"] - 0.6) <= 0.03, schedule.latency
    model = timm.create_model("kcp_pruned", base="resnet18", num_classes=2,
                              checkpoint_path=str(tmp_path / "run" / "last.pth.tar")).eval()
    assert kcp_plugin.get_plan(model) == kcp_plugin.get_plan(schedule.model)


def test_timm_train_refuses_bad_latency_options_before_training(tmp_path):
    tool = _tool("timm_train")
    for argv, match in [
        (["--kcp-target-latency", "1.5"], r"target_latency_ratio must be in \(0, 1\]"),
        (["--kcp-target-latency", "0.5", "--kcp-latency-backend", "tensorrt"],
         "unknown latency backend 'tensorrt'; valid: torch, onnxruntime, cuda"),
        (["--kcp-target-latency", "0.5", "--kcp-latency-backend", "cuda",
          "--kcp-latency-dtype", "int8"], "cannot run dtype 'int8'"),
        (["--kcp-target-latency", "0.5", "--kcp-latency-allocation", "tabel"],
         "close matches: table"),
        (["--kcp-target-latency", "0.5", "--kcp-prune-kwargs", "{'round_to': 8}"],
         "round_to: latency_allocation='table'"),
        (["--kcp-latency-backend", "cuda"], "add --kcp-target-latency"),
    ]:
        with pytest.raises(SystemExit, match=match):
            tool.parse_kcp(argv)
    # a dict literal and the field flags make one backend
    kcp, _ = tool.parse_kcp(["--kcp-target-latency", "0.5", "--kcp-latency-backend",
                             "{'name': 'cuda', 'dtype': 'bf16'}", "--kcp-latency-batch", "64"])
    assert kcp.kcp_latency == kcp_plugin.Backend("cuda", dtype="bf16", batch=64)
    if not torch.cuda.is_available():  # refused before timm's train.py runs
        script = tmp_path / "train.py"
        script.write_text("raise RuntimeError('must not run')\n")
        with pytest.raises(SystemExit, match="needs an NVIDIA GPU"):
            tool.run_train_script(str(script), kcp, [])


def test_latency_recipes_parse(tmp_path):
    tool = _tool("timm_train")
    for name in ("resnet50_lat50_cuda", "resnet18_lat_smoke"):
        path = os.path.join(ROOT, "configs", "timm", f"{name}.yaml")
        args = tool.parse_builtin([str(tmp_path), "--config", path])
        kcp, _ = tool.parse_kcp(["--config", path])
        assert 0 < kcp.kcp_target_latency < 1 and kcp.kcp_latency is not None
        assert args.kcp_target_latency == kcp.kcp_target_latency and timm.is_model(args.model)
    kcp, _ = tool.parse_kcp(["--config", os.path.join(ROOT, "configs", "timm",
                                                      "resnet50_lat50_cuda.yaml")])
    assert kcp.kcp_latency == kcp_plugin.Backend("cuda", dtype="bf16", batch=64)


def test_training_schedule_logs_each_pruning_point_through_timms_logger(caplog):
    import logging

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = kt.TimmPruningSchedule(model, opt, "l1", example_inputs=_x(32, batch=1),
                                   target_macs_ratio=0.5, num_prunes=2, every=1)
    with caplog.at_level(logging.INFO, logger="train"):
        assert sched.step() and sched.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert len(lines) == 2 and lines[0].startswith("kcp_plugin: pruning point 1/2 at optimizer "
                                                   "step 0 (hard)")
    assert "2/2 at optimizer step 1" in lines[1] and "% of dense" in lines[1]
