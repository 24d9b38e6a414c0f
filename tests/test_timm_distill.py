"""Distillation from the dense model in timm's recipes: ``tools/timm_train.py --distill`` (the
built-in loop, exact resume with the teacher saved apart; ``--train-script`` through timm's
``ClassificationTask``, also under ``torchrun``) and ``TimmPruningSchedule(distill=...)``.

Run as a script under ``torchrun`` (``ddp WORK_DIR DATA_DIR``) it is one rank of the DDP test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import kcp_plugin
import kcp_plugin.integrations.timm as kt
from kcp_plugin.distill import DistillConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "tests", "timm_scripts", "train.py")
warnings.filterwarnings("ignore", message="Unwrapped parameters detected")

# test_resnet: timm's smallest ResNet (0.37 M parameters), at 16x16
_DATA_ARGS = ["--model", "test_resnet", "--num-classes", "2", "--input-size", "3", "16", "16"]
_PRUNE_ARGS = ["--kcp-target-macs", "0.5", "--kcp-num-prunes", "2", "--kcp-start", "1"]


def _tool():
    spec = importlib.util.spec_from_file_location("_tool_timm_train_distill",
                                                  os.path.join(ROOT, "tools", "timm_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(root) -> None:
    """Two colour classes of noisy 16x16 images: 6 per class to train on (3 batches of 4),
    2 per class to validate on."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("validation", 2)):
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (16, 16, 3)),
                              0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _images(root)
    return root


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("argv,message", [
    (["--distill", "kll", *_PRUNE_ARGS], r"--distill: unknown distillation 'kll'; close matches: "
     r"kl; choose one of kl, cwd, l1, mse, features, none"),
    (["--distill", "kl"], "add --kcp-target-macs or --kcp-target-latency"),
    (["--distill-layers", "layer4", *_PRUNE_ARGS], "--distill-layers refine --distill: add "
     r"--distill kl \| cwd \| l1 \| mse \| features"),
    (["--distill-config", '{"weigth": 2}', *_PRUNE_ARGS], "unknown distillation setting "
     "'weigth'; close matches: weight.*; valid: output, temperature, weight"),
    (["--distill", "kl", "--distill-weight", "-1", *_PRUNE_ARGS],
     "distillation weight must be a number >= 0"),
    (["--distill", "features", *_PRUNE_ARGS], "this distillation has no term"),
    (["--distill", "kl", "--distill-config", "{'adapter': True}", *_PRUNE_ARGS],
     r"adapters \(adapter=True\) need a student of fixed width"),
    (["--distill", "kl", "--distill-config", "[1]", *_PRUNE_ARGS], "expected a dict"),
])
def test_bad_distillation_options_are_named_before_anything_is_built(argv, message):
    with pytest.raises(SystemExit, match=message):
        _tool().parse_kcp(argv)


def test_distillation_options_make_one_config_from_flags_and_yaml(tmp_path):
    tool = _tool()
    kcp, rest = tool.parse_kcp(["--distill", "kl", "--distill-layers", "layer3, layer4",
                                "--distill-weight", "2", "--distill-temperature", "3",
                                "--distill-config", '{"dca_layers": ["layer2"], "dca_batches": 2}',
                                *_PRUNE_ARGS, "--distill-loss-weight", "0.5"])
    assert kcp.distill == DistillConfig("kl", temperature=3.0, weight=2.0,
                                        layers=["layer3", "layer4"], dca_layers=["layer2"],
                                        dca_batches=2)
    assert rest == ["--distill-loss-weight", "0.5"]  # train.py's own option is left to it
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("kcp_target_macs: 0.5\ndistill: cwd\ndistill_layers: [layer4]\n"
                      "distill_layer_weight: 0.5\ndistill_loss_weight: 0.3\n")
    kcp, _ = tool.parse_kcp(["--config", str(recipe)])
    assert kcp.distill == DistillConfig("cwd", layers=["layer4"], layer_weight=0.5)
    assert kcp.distill.temperature == 4.0  # cwd's default
    kcp, _ = tool.parse_kcp(["--config", str(recipe), "--distill", "features"])
    assert kcp.distill.output is None and kcp.distill.layers == ["layer4"]  # flags win
    kcp, _ = tool.parse_kcp(["--config", str(recipe), "--distill", "none"])
    assert kcp.distill is None  # off, whatever else the YAML says
    assert tool.describe_distill(DistillConfig("kl", layers=["layer4"], dca_layers=["layer3"])) \
        == ("kl (T 1, weight 1) + features of layer4 (weight 1) + DCA of layer3 (weight 1, "
            "after 8 batches)")


# ---------------------------------------------------------------------- built-in loop
def _builtin(tool, data, out, experiment, *extra):
    return tool.run_builtin([
        str(data), *_DATA_ARGS, "--batch-size", "4", "--opt", "sgd", "--lr", "0.01",
        "--epochs", "2", "--warmup-epochs", "0", "--workers", "0", "--log-interval", "100",
        "--model-ema", "--drop-path", "0.1", *_PRUNE_ARGS, "--kcp-every", "3",
        "--distill", "kl", "--distill-layers", "layer4", "--distill-temperature", "2",
        "--distill-config", '{"dca_layers": ["layer3"], "dca_batches": 2}',
        "--output", str(out), "--experiment", experiment, *extra])


def test_builtin_loop_distils_and_resumes_exactly(image_folder, tmp_path):
    """Two epochs of 3 steps, pruning points at steps 1 and 4 (one on each side of the
    interruption), output KL + kept-channel features + DCA: the run interrupted after epoch 0
    and resumed (in another folder) ends with the uninterrupted run's weights, EMA and
    schedule state (DCA statistics); the teacher is the dense model as training started,
    saved once beside the checkpoints, never inside them."""
    tool = _tool()
    full = _builtin(tool, image_folder, tmp_path, "full")
    half = _builtin(tool, image_folder, tmp_path, "half", "--max-steps", "3")
    resumed = _builtin(tool, image_folder, tmp_path / "elsewhere", "resumed", "--resume",
                       half["checkpoint"])
    assert (full["pruned_at_steps"], half["pruned_at_steps"], resumed["pruned_at_steps"]) == (
        [1, 4], [1], [4])
    assert full["steps"] == resumed["steps"] == 6 and half["steps"] == 3
    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    dca_a = a["kcp_schedule"]["distill"]["_extra_state"]["dca"]["layer3"]
    dca_b = b["kcp_schedule"]["distill"]["_extra_state"]["dca"]["layer3"]
    assert dca_a["batches"] == dca_b["batches"] == 2  # dca_batches
    assert torch.equal(dca_a["gram"], dca_b["gram"])
    assert a["kcp_schedule"]["calls"] == b["kcp_schedule"]["calls"] == 6
    # the teacher: the dense model as created (seed 42), in its own file
    assert full["distill"] == DistillConfig("kl", temperature=2.0, layers=["layer4"],
                                            dca_layers=["layer3"], dca_batches=2).to_dict()
    assert a["kcp_distill"] == {"config": full["distill"], "teacher": "teacher.pth.tar"}
    timm.utils.random_seed(42)
    dense = timm.create_model("test_resnet", num_classes=2, drop_path_rate=0.1)
    for summary in (full, resumed):
        saved = torch.load(summary["teacher"], weights_only=True)["state_dict"]
        assert all(torch.equal(v, saved[k]) for k, v in dense.state_dict().items())
    assert os.path.dirname(resumed["teacher"]) == resumed["output"]  # copied to the new folder
    # the checkpoints hold the pruned student (and its EMA), nothing of the teacher
    again = timm.create_model("kcp_pruned", base="test_resnet", num_classes=2,
                              checkpoint_path=full["checkpoint"])
    assert a["state_dict"].keys() == again.state_dict().keys()
    assert all(a["state_dict_ema"][k].shape == v.shape for k, v in a["state_dict"].items())
    assert kcp_plugin.count_macs_params(again, torch.zeros(1, 3, 16, 16))[0] == full["macs"]
    header = open(os.path.join(full["output"], "summary.csv")).readline()
    assert "distill_loss" in header
    # resuming needs the teacher file beside the checkpoint
    os.remove(os.path.join(half["output"], "teacher.pth.tar"))
    with pytest.raises(SystemExit, match=r"teacher.pth.tar \(the teacher's weights\) is missing"):
        _builtin(tool, image_folder, tmp_path, "again", "--resume", half["checkpoint"])


def test_builtin_loop_refuses_a_model_pruned_at_creation(image_folder, tmp_path):
    tool = _tool()
    with pytest.raises(SystemExit, match="created pruned.*dense teacher is not there"):
        tool.run_builtin([str(image_folder), "--model", "kcp_pruned", "--model-kwargs",
                          "base=test_resnet", "target_macs_ratio=0.5", "input_size=16",
                          "--num-classes", "2", "--workers", "0", "--output", str(tmp_path),
                          "--distill", "kl", *_PRUNE_ARGS])


# ---------------------------------------------------------------------- own loop
def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 2, (4,), generator=g))
            for _ in range(n)]


def test_schedule_distils_in_an_own_loop_and_keeps_the_teacher_apart():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    schedule = kt.TimmPruningSchedule(
        model, optimizer, "l1", input_size=16, target_macs_ratio=0.5, num_prunes=2, start=1,
        every=1, emas=[ema], distill={"output": "kl", "layers": ["layer4"]}).attach()
    teacher = schedule.distiller.teacher
    dense_macs = kcp_plugin.count_macs_params(teacher, torch.zeros(1, 3, 16, 16))[0]
    seen = []
    for inputs, target in _batches(3):
        out = model(inputs)
        terms = schedule.distill_loss(inputs, out, target)
        seen.append(sorted(terms))
        loss = torch.nn.functional.cross_entropy(out, target) + sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
    assert schedule.pruned_at == [1, 2]
    assert seen == [["loss_distill_feat", "loss_distill_out"]] * 3
    # the teacher stayed dense, frozen, outside the model, the optimizer and the EMA
    assert kcp_plugin.count_macs_params(teacher, torch.zeros(1, 3, 16, 16))[0] == dense_macs
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert not held & {id(p) for p in teacher.parameters()}
    assert all(m is not teacher for m in model.modules())
    assert {k: v.shape for k, v in ema.module.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert "teacher" not in json.dumps(list(schedule.state_dict()))


def test_schedule_refuses_a_teacher_the_loop_would_see():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ema = timm.utils.ModelEmaV3(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(input_size=16, target_macs_ratio=0.5)
    cases = [
        (dict(distill="kll"), "unknown output distillation 'kll'.*choose one of kl, cwd, l1, mse"),
        (dict(distill="kl", teacher=model), "shares parameters with the model"),
        (dict(distill="kl", teacher=ema.module, emas=[ema]), "one of the EMA copies"),
        (dict(teacher=ema.module), "teacher= is given without distill="),
        (dict(distill={"output": "kl", "layers": ["layer9"]}),
         "distillation layer 'layer9' does not exist"),
        (dict(distill={"output": "kl", "adapter": True}), "adapters"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            kt.TimmPruningSchedule(model, optimizer, "l1", **kwargs, **extra)
    assert not kcp_plugin.get_plan(model)["history"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pruned = timm.create_model("kcp_pruned", base="test_resnet", num_classes=2,
                               target_macs_ratio=0.7, input_size=16)
    with pytest.raises(ValueError, match="pruned already: pass teacher="):
        kt.TimmPruningSchedule(pruned, torch.optim.SGD(pruned.parameters(), lr=0.1), "l1",
                               distill="kl", **kwargs)


# ---------------------------------------------------------------------- timm's train.py
_SCRIPT_ARGS = [*_DATA_ARGS, "-b", "4", "--lr", "0.01", "--epochs", "1", "--warmup-epochs", "0",
                "-j", "0", "--device", "cpu", "--log-interval", "1"]


def test_train_script_distils_through_timms_training_task(image_folder, tmp_path):
    """timm's real train.py, unchanged: its loss gains the distillation terms (its
    ClassificationTask replaced in the loaded script), pruning points follow, and its
    checkpoints (model and EMA) hold the pruned student alone."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "timm_train.py"), "--train-script",
         TRAIN_PY, str(image_folder), *_SCRIPT_ARGS, "--output", str(tmp_path), "--experiment",
         "run", "--model-ema", *_PRUNE_ARGS, "--kcp-every", "1", "--distill", "kl",
         "--distill-layers", "layer4"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    log = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0, "\n".join(log[-30:])
    distilling = [line for line in log if line.startswith("kcp_plugin: distilling")]
    assert distilling == ["kcp_plugin: distilling from the dense model (frozen; not in the "
                          "optimizer, the EMA, DDP or the checkpoints): kl (T 1, weight 1) + "
                          "features of layer4 (weight 1)"]
    points = [line.split(" at ")[0] for line in log if line.startswith("kcp_plugin: pruning")]
    assert points == ["kcp_plugin: pruning point 1/2", "kcp_plugin: pruning point 2/2"]
    ckpt = torch.load(tmp_path / "run" / "last.pth.tar", map_location="cpu",
                      weights_only=False)  # train.py saves its argparse.Namespace too
    model = timm.create_model("kcp_pruned", base="test_resnet", num_classes=2,
                              checkpoint_path=str(tmp_path / "run" / "last.pth.tar"))
    assert ckpt["state_dict"].keys() == ckpt["state_dict_ema"].keys() \
        == model.state_dict().keys()
    dense = timm.create_model("test_resnet", num_classes=2)
    x = torch.zeros(1, 3, 16, 16)
    ratio = kcp_plugin.count_macs_params(model, x)[0] / kcp_plugin.count_macs_params(dense, x)[0]
    assert abs(ratio - 0.5) <= 0.02


def test_train_script_refuses_what_it_cannot_distil(tmp_path):
    """Before train.py's main() runs: timm's own distillation beside --distill, --resume (the
    teacher is not in train.py's checkpoints), a train.py without timm's training tasks."""
    tool = _tool()
    cases = [
        (["--kd-model-name", "resnet18"], "--distill and train.py's --kd-model-name both "
         "distil"),
        (["--resume", str(tmp_path / "last.pth.tar")], "--resume with --distill is not "
         "supported with --train-script.*built-in loop"),
    ]
    for extra, message in cases:
        kcp, rest = tool.parse_kcp([str(tmp_path), *_SCRIPT_ARGS, *_PRUNE_ARGS, "--distill",
                                    "kl", *extra])
        with pytest.raises(SystemExit, match=message):
            tool.run_train_script(TRAIN_PY, kcp, rest)
    old = tmp_path / "train.py"
    old.write_text("from timm.models import create_model\n\n"
                   "def main():\n    raise RuntimeError('must not run')\n")
    kcp, rest = tool.parse_kcp([*_PRUNE_ARGS, "--distill", "kl"])
    with pytest.raises(SystemExit, match="ClassificationTask.*use the built-in loop"):
        tool.run_train_script(str(old), kcp, rest)


# ---------------------------------------------------------------------- DDP
def test_train_script_distils_under_ddp(image_folder, tmp_path):
    """torchrun, 2 processes (gloo, CPU), timm's train.py with --distill: train.py seeds each
    rank differently, yet both ranks distil from the same teacher (copied after DDP's
    broadcast), which no DDP wrapper holds; ranks prune alike and stay in sync."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__),
         "ddp", str(tmp_path), str(image_folder)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pruned_at"] == ranks[1]["pruned_at"] == [1, 2]
    assert ranks[0]["teacher"] == ranks[1]["teacher"]  # one teacher, replicated
    assert ranks[0]["initial"] != ranks[1]["initial"]  # though each rank started elsewhere
    assert ranks[0]["student"] == pytest.approx(ranks[1]["student"], rel=1e-6)
    assert not any(r["wrapper_holds_teacher"] for r in ranks)
    assert all(r["wrapper_holds_model"] for r in ranks)
    assert ranks[0]["plan"] == ranks[1]["plan"]


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _ddp_rank(work_dir: str, data_dir: str) -> None:
    """One rank of :func:`test_train_script_distils_under_ddp`."""
    import kcp_plugin.distill as kd

    torch.set_num_threads(1)
    tool = _tool()
    made, initial = [], {}
    real = kd.Distiller

    class Recorded(real):
        def __init__(self, teacher, student, *args, **kwargs):
            super().__init__(teacher, student, *args, **kwargs)
            made.append(self)

    kd.Distiller = Recorded  # what _distilling_task builds
    real_create = timm.models.create_model

    def create(*args, **kwargs):
        model = real_create(*args, **kwargs)
        initial.setdefault("checksum", _checksum(model))  # this rank's own initialisation
        return model

    argv = [data_dir, *_SCRIPT_ARGS, "-b", "2", "--output", os.path.join(work_dir, "out"),
            "--experiment", "ddp", *_PRUNE_ARGS, "--kcp-every", "1", "--distill", "kl",
            "--distill-layers", "layer4"]
    kcp, rest = tool.parse_kcp(argv)
    timm.models.create_model = create  # train.py imports it when loaded: patched before
    try:
        schedule = tool.run_train_script(TRAIN_PY, kcp, rest)
    finally:
        timm.models.create_model = real_create
        kd.Distiller = real
    (distiller,) = made
    wrapper = schedule.ddp[0]
    wrapped = {id(p) for p in wrapper.parameters()}
    out = {"pruned_at": schedule.pruned_at, "plan": kcp_plugin.get_plan(schedule.model),
           "teacher": _checksum(distiller.teacher), "student": _checksum(schedule.model),
           "initial": initial["checksum"],
           "wrapper_holds_teacher": any(id(p) in wrapped for p in distiller.teacher.parameters()),
           "wrapper_holds_model": wrapped == {id(p) for p in schedule.model.parameters()}}
    with open(os.path.join(work_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "ddp":
    _ddp_rank(sys.argv[2], sys.argv[3])
