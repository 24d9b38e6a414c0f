"""Distillation in the mmseg ``PruningHook`` (``distill=``), with the real mmengine Runner.

The CPU recipe's narrow FCN-ResNet18 on a few generated scenes, for a handful of iterations:
the distillation terms join mmseg's loss dict (summed, logged), each step costs one extra
(teacher) forward, the teacher stays frozen and outside the optimizer and the state dicts, it
is written once per run and rebuilt on resume (a resumed run ends as the uninterrupted one),
and bad settings fail before training.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint

import kcp_plugin.integrations.mmseg as kmm
from kcp_plugin import get_plan
from kcp_plugin.integrations.mmseg.distill import TEACHER_FILE

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "mmseg" / "fcn_r18-tiny_kcp50_generated-64x64_cpu.py"
EXAMPLE = REPO / "configs" / "mmseg" / "pspnet_r50-d8_kcp50-cwd_4xb2-40k_cityscapes-512x1024.py"
ITERS = 8
CKPT_EVERY = 3  # iter_3 lies between the pruning points at 0 and 4
SCHEDULE = dict(num_prunes=2, start=0, every=4)
DISTILL = dict(type="kl", weight=1.0, layers=["backbone.layer3", "backbone.layer4.1.conv2"],
               layer_weight=0.5, dca_layers=["backbone.layer4"], dca_batches=2, dca_weight=0.5)
TERMS = ("loss_distill_out", "loss_distill_feat", "loss_distill_dca")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs gain nothing from intra-op threads; on a busy 2-core machine they lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kcp_distill_scenes"))


def distill_cfg(work_dir, data_root: str, iters: int = ITERS, distill=DISTILL, **hook) -> Config:
    """The CPU recipe, deterministic (no flips, no dropout), small and quiet, distilling."""
    cfg = Config.fromfile(str(RECIPE))
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f"kcp-distill-{uuid.uuid4().hex[:8]}"
    cfg.visualizer.name = cfg.experiment_name
    for loader, split, n in ((cfg.train_dataloader, "train", 32), (cfg.val_dataloader, "val", 4)):
        loader.dataset.data_root = f"{data_root}/{split}{n}"
        loader.dataset.num_images = n
        loader.dataset.pipeline = cfg.test_pipeline
    cfg.train_dataloader.batch_size = 4
    cfg.test_dataloader = cfg.val_dataloader
    cfg.model.decode_head.dropout_ratio = 0.0
    cfg.model.auxiliary_head.dropout_ratio = 0.0
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=10**6)
    cfg.param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=iters,
                                by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False,
                                        interval=CKPT_EVERY)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1000)
    cfg.log_level = "WARNING"
    cfg.randomness = dict(seed=0)
    settings = dict(importance="kcp", target_macs_ratio=0.5, schedule=SCHEDULE)
    settings.update(hook)
    cfg.custom_hooks = [dict(type="kcp_plugin.PruningHook", distill=distill, **settings)]
    return cfg


def pruning_hook(runner: Runner) -> kmm.PruningHook:
    return next(h for h in runner.hooks if isinstance(h, kmm.PruningHook))


def unwrapped(runner: Runner) -> nn.Module:
    return kmm.structure.unwrap(runner.model)


class Probe(Hook):
    """Counts, per training step, the forwards of the student's and the teacher's backbones,
    and keeps the teacher's weights as training starts (after the pruning hook built it)."""

    priority = "NORMAL"  # after the PruningHook (ABOVE_NORMAL): its pruning is not counted

    def __init__(self):
        self.counts = {"student": 0, "teacher": 0}
        self.per_step: list[dict[str, int]] = []
        self.teacher_start: dict[str, torch.Tensor] | None = None
        self.model_start: dict[str, torch.Tensor] | None = None

    def before_train(self, runner) -> None:
        hook = pruning_hook(runner)
        teacher, model = hook.distiller.teacher, unwrapped(runner)
        self.teacher_start = copy.deepcopy(teacher.state_dict())
        self.model_start = copy.deepcopy(model.state_dict())
        for role, backbone in (("student", model.backbone), ("teacher", teacher.backbone)):
            def count(module, _inputs, _output, role=role, backbone=backbone):
                if module is backbone:  # not a copy (the kept-channel replay copies the teacher)
                    self.counts[role] += 1
            backbone.register_forward_hook(count)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.counts = {"student": 0, "teacher": 0}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.per_step.append(dict(self.counts))


def train(cfg: Config, probe: Probe | None = None) -> Runner:
    runner = Runner.from_cfg(cfg)
    if probe is not None:
        runner.register_hook(probe)
    runner.train()
    return runner


@pytest.fixture(scope="module")
def distilled(one_thread, tmp_path_factory, data_root):
    """ITERS iterations, pruned at 0 and 4 (to half the MACs), distilling output, features
    and DCA, checkpoints every CKPT_EVERY iterations."""
    work = tmp_path_factory.mktemp("distilled")
    probe = Probe()
    runner = train(distill_cfg(work, data_root), probe)
    return {"runner": runner, "work": work, "probe": probe}


def scalars(runner: Runner, key: str) -> torch.Tensor:
    return torch.as_tensor(runner.message_hub.get_scalar(f"train/{key}").data[0])


# --------------------------------------------------------------------------- the training step
def test_terms_join_the_loss_dict_and_the_total(distilled):
    runner = distilled["runner"]
    model = unwrapped(runner)
    assert pruning_hook(runner).scheduler.finished  # both pruning points ran
    assert get_plan(model)["history"]
    total = scalars(runner, "loss")
    assert len(total) == ITERS
    parts = {k: scalars(runner, k) for k in ("decode.loss_ce", "aux.loss_ce", *TERMS)}
    for key in TERMS:  # logged at every iteration, like mmseg's own terms
        assert len(parts[key]) == ITERS, key
        assert torch.isfinite(parts[key]).all(), key
    # the total mmengine optimised is mmseg's loss plus the distillation terms
    torch.testing.assert_close(total, sum(parts.values()), rtol=1e-5, atol=1e-6)
    out = parts["loss_distill_out"]
    # the model is the teacher until the first point prunes it (before iteration 0 trains,
    # so iteration 0 already differs); the DCA term starts after dca_batches=2 batches
    assert (out > 0).all()
    assert (parts["loss_distill_dca"][:1] == 0).all() and (parts["loss_distill_dca"][2:] > 0).all()


def test_one_extra_forward_per_step_the_teachers(distilled):
    """The student's logits come from the forward mmseg's loss runs: per step the student's
    backbone runs once, the teacher's once (under no_grad), nothing else."""
    assert distilled["probe"].per_step == [{"student": 1, "teacher": 1}] * ITERS


def test_teacher_is_frozen_apart_from_the_model_and_on_its_device(distilled):
    runner, probe = distilled["runner"], distilled["probe"]
    hook = pruning_hook(runner)
    teacher, model = hook.distiller.teacher, unwrapped(runner)
    # the dense model as training started (before the first point pruned it), unchanged
    assert probe.teacher_start.keys() == probe.model_start.keys()
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, probe.teacher_start[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(value, probe.model_start[key], rtol=0, atol=0, msg=key)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert get_plan(teacher)["history"] == []  # dense
    assert next(teacher.parameters()).device == next(model.parameters()).device
    # not in the optimizer, not a submodule of the model, not in its state dict or checkpoints
    held = {id(p) for g in runner.optim_wrapper.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert not held & {id(p) for p in teacher.parameters()}
    assert all(m is not teacher for m in runner.model.modules())
    ckpt = _load_checkpoint(str(Path(distilled["work"]) / f"iter_{ITERS // 2 + 2}.pth"))
    assert ckpt["state_dict"].keys() == model.state_dict().keys()
    meta = ckpt["meta"]["kcp_plugin"]["distill"]
    assert meta["teacher"] == str(Path(distilled["work"]) / TEACHER_FILE)
    assert meta["config"]["output"] == "kl" and meta["config"]["dca_layers"] == ["backbone.layer4"]
    # the DCA statistics travel in the scheduler state (small), the teacher's weights do not
    state = ckpt["meta"]["kcp_plugin"]["scheduler"]["distill"]
    assert set(state) == {"_extra_state"}
    assert state["_extra_state"]["dca"]["backbone.layer4"]["batches"] == 2
    # the teacher file: written once, the dense weights
    saved = torch.load(Path(distilled["work"]) / TEACHER_FILE, weights_only=True)
    assert saved["run_id"] == meta["run_id"] and saved["plan"]["history"] == []
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(value, probe.teacher_start[key].cpu(), rtol=0, atol=0)
    # after training the segmentor has its own loss back and the feature hooks are gone
    assert "loss" not in model.__dict__
    assert not hook.distiller._handles


# --------------------------------------------------------------------------- resume
def test_resume_after_a_pruning_point_matches_uninterrupted(distilled, tmp_path, data_root):
    """Resumed from iter_3 (after the first point, before the second) in another work_dir:
    the teacher is rebuilt from the first run's file, the DCA statistics come with the
    scheduler state, and the run ends with the same weights and losses."""
    src = Path(distilled["work"]) / f"iter_{CKPT_EVERY}.pth"
    meta = _load_checkpoint(str(src))["meta"]["kcp_plugin"]
    assert meta["scheduler"]["calls"] == CKPT_EVERY and meta["plan"]["history"]
    shutil.copy(src, tmp_path / src.name)  # the checkpoint alone: the teacher is found by
    cfg = distill_cfg(tmp_path, data_root)  # the path its meta records
    cfg.resume = True
    cfg.load_from = str(tmp_path / src.name)
    probe = Probe()
    resumed = train(cfg, probe)
    a, b = unwrapped(distilled["runner"]), unwrapped(resumed)
    assert get_plan(b) == get_plan(a)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-4, atol=1e-5, msg=key)
    for key in ("loss", *TERMS):
        torch.testing.assert_close(scalars(resumed, key), scalars(distilled["runner"], key),
                                   rtol=1e-4, atol=1e-5, msg=key)
    assert probe.per_step == [{"student": 1, "teacher": 1}] * (ITERS - CKPT_EVERY)
    # the rebuilt teacher is the first run's; this work_dir gets its own copy of the file
    ta, tb = pruning_hook(distilled["runner"]).distiller.teacher, pruning_hook(resumed).distiller
    for key, value in ta.state_dict().items():
        torch.testing.assert_close(tb.teacher.state_dict()[key], value, rtol=0, atol=0)
    assert (tmp_path / TEACHER_FILE).is_file()


@pytest.mark.parametrize("damage, error, match", [
    ("path", FileNotFoundError, "no teacher file exists at .*gone.*distill_teacher.pth"),
    ("run_id", ValueError, "holds the teacher of another run"),
    ("shape", ValueError, r"does not fit the model .*conv_seg.weight: file \(4, 64, 1, 1\)"),
], ids=["missing-file", "other-run", "other-model"])
def test_resume_without_the_runs_teacher_file_fails_before_training(
        distilled, tmp_path, data_root, damage, error, match):
    ckpt = _load_checkpoint(str(Path(distilled["work"]) / f"iter_{CKPT_EVERY}.pth"))
    record = ckpt["meta"]["kcp_plugin"]["distill"]
    if damage == "path":
        record["teacher"] = str(tmp_path / "gone" / TEACHER_FILE)
    else:  # a teacher file beside the checkpoint, of another run / another model
        teacher = torch.load(Path(distilled["work"]) / TEACHER_FILE, weights_only=True)
        if damage == "run_id":
            record["run_id"] = "another-run"
        else:
            teacher["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(4, 64, 1, 1)
        torch.save(teacher, tmp_path / TEACHER_FILE)
    torch.save(ckpt, tmp_path / "resume.pth")
    cfg = distill_cfg(tmp_path, data_root)
    cfg.resume = True
    cfg.load_from = str(tmp_path / "resume.pth")
    runner = Runner.from_cfg(cfg)
    with pytest.raises(error, match=match):
        runner.train()
    assert not list(tmp_path.glob("iter_*.pth"))


def test_load_from_a_pruned_checkpoint_distils_from_the_loaded_model(distilled, tmp_path,
                                                                    data_root):
    """Not a resume: the pruned checkpoint as loaded is the teacher, pruned further from."""
    src = Path(distilled["work"]) / f"iter_{2 * CKPT_EVERY}.pth"
    cfg = distill_cfg(tmp_path, data_root, iters=3, target_macs_ratio=0.4,
                      schedule=dict(num_prunes=1, start=1))
    cfg.load_from = str(src)
    probe = Probe()
    runner = train(cfg, probe)
    teacher = pruning_hook(runner).distiller.teacher
    loaded = _load_checkpoint(str(src))
    assert get_plan(teacher) == loaded["meta"]["kcp_plugin"]["plan"]
    for key, value in probe.teacher_start.items():  # the checkpoint's weights, unchanged
        torch.testing.assert_close(value, loaded["state_dict"][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert len(scalars(runner, "loss_distill_out")) == 3
    # this run's own teacher file and id, not the loaded run's
    saved = torch.load(tmp_path / TEACHER_FILE, weights_only=True)
    assert saved["run_id"] != loaded["meta"]["kcp_plugin"]["distill"]["run_id"]


# --------------------------------------------------------------------------- DDP
DDP_RANK = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # mmengine's own init calls torch.cuda.set_device
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from mmengine.runner import Runner
from torch.nn.parallel import DistributedDataParallel
from test_mmseg_distill import distill_cfg, pruning_hook, scalars

cfg = distill_cfg({work!r}, {data_root!r}, iters=4, schedule=dict(num_prunes=1, start=1))
cfg.launcher = "pytorch"
cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
cfg.train_dataloader.batch_size = 2
runner = Runner.from_cfg(cfg)
runner.train()
ddp, teacher = runner.model, pruning_hook(runner).distiller.teacher
ids = {{id(p) for p in teacher.parameters()}}
out = {{"wrapped": isinstance(ddp, DistributedDataParallel),
        "teacher_in_ddp": any(id(p) in ids for p in ddp.parameters()),
        "teacher_wrapped": isinstance(teacher, DistributedDataParallel),
        "checksum": float(sum(p.double().sum() for p in ddp.module.parameters())),
        "distill": scalars(runner, "loss_distill_out").tolist()}}
with open(os.path.join({work!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
    json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_each_rank_distils_its_batch_with_its_own_teacher(distilled, tmp_path, data_root):
    """2 gloo processes: the teacher is not wrapped (each rank runs its own copy on its own
    batch), the student is, and the ranks end with the same weights."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(DDP_RANK.format(
        tests=str(REPO / "tests"), work=str(tmp_path), data_root=data_root)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["wrapped"] and not rank["teacher_in_ddp"] and not rank["teacher_wrapped"]
        assert len(rank["distill"]) == 4 and all(v > 0 for v in rank["distill"][1:])
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    assert ranks[0]["distill"] != ranks[1]["distill"]  # each rank distils its own batch
    assert (tmp_path / TEACHER_FILE).is_file()  # rank 0 wrote it at iter_3


# --------------------------------------------------------------------------- what it optimises
def test_distillation_alone_brings_the_pruned_student_to_the_teacher(tmp_path, data_root):
    """mmseg's own losses weighted 0: the only gradient is the distillation terms', so they
    fall (one-shot pruning_ratio run: the distiller without a scheduler)."""
    cfg = distill_cfg(tmp_path, data_root, iters=12, schedule=None, target_macs_ratio=None,
                      pruning_ratio=0.4, distill=dict(type="kl", weight=1.0,
                                                      layers=["backbone.layer4"]))
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.loss_decode.loss_weight = 0.0
    runner = train(cfg)
    out, feat = scalars(runner, "loss_distill_out"), scalars(runner, "loss_distill_feat")
    assert out[0] > 0 and feat[0] > 0
    # measured (seed 0): out 1.05e-3 -> 0.52e-3, feat 0.44 -> 0.18 over the 12 iterations
    assert out[-3:].mean() < 0.75 * out[:3].mean(), out
    assert feat[-3:].mean() < 0.75 * feat[:3].mean(), feat
    assert "loss_distill_dca" not in runner.message_hub.log_scalars


def test_epoch_schedule_distils_every_iteration_of_the_epoch(tmp_path, data_root):
    """by_epoch: the pruning point is the epoch's first iteration, the distillation every one."""
    cfg = distill_cfg(tmp_path, data_root, schedule=dict(num_prunes=1, start=0, by_epoch=True),
                      distill="kl")
    cfg.train_dataloader.sampler = dict(type="DefaultSampler", shuffle=True)
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1, val_interval=10**6)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=10**6)
    probe = Probe()
    runner = train(cfg, probe)
    iters = 32 // 4
    assert runner.iter == iters and pruning_hook(runner).scheduler.finished
    assert len(scalars(runner, "loss_distill_out")) == iters
    assert probe.per_step == [{"student": 1, "teacher": 1}] * iters


# --------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("distill, error, match", [
    (dict(type="kll"), ValueError, "unknown output distillation 'kll'.*close matches: kl"),
    (dict(type="kl", layer=["backbone.layer4"]), ValueError,
     "unknown distillation setting 'layer'.*close matches: layers"),
    (dict(type="kl", output="cwd"), ValueError, "give 'type' or 'output'"),
    (dict(type="cwd", weight=-1.0), ValueError, "weight must be a number >= 0"),
    (dict(type="kl", adapter=True, layers=["backbone.layer4"]), ValueError,
     "adapter=True is not supported"),
    (3, TypeError, "distill must be None"),
])
def test_hook_rejects_bad_distillation_settings_when_built(distill, error, match):
    with pytest.raises(error, match=match):
        HOOKS.build(dict(type="kcp_plugin.PruningHook", target_macs_ratio=0.5, distill=distill))


@pytest.mark.parametrize("distill, match", [
    (dict(type="kl", layers=["backbone.layer5"]), "layer 'backbone.layer5' does not exist"),
    (dict(type=None, dca_layers=["backbone.layr4"]), "close matches: backbone.layer4"),
    (dict(type="kl", layers=["decode_head"]), "'decode_head' is a head"),
])
def test_unknown_distillation_layer_fails_before_training(tmp_path, data_root, distill, match):
    runner = Runner.from_cfg(distill_cfg(tmp_path, data_root, distill=distill))
    with pytest.raises(ValueError, match=match):
        runner.train()
    assert runner.iter == 0 and not list(tmp_path.glob("iter_*.pth"))


def test_example_config_builds_its_hook():
    cfg = Config.fromfile(str(EXAMPLE))
    (spec,) = cfg.custom_hooks
    hook = HOOKS.build(copy.deepcopy(spec))
    assert hook.distill.output == "cwd" and hook.distill.temperature == 4.0
    assert hook.target_macs_ratio == 0.5 and hook.schedule["num_prunes"] == 5
    assert cfg.load_from.startswith("https://download.openmmlab.com/mmsegmentation/")
